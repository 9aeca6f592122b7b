"""Tensor-parallel state and collectives (one rank until TP lands)."""
