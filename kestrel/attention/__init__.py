"""Attention backends: prepare per-batch metadata once, then run each layer's attention."""
