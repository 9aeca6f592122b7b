"""The device side: worker (model, KV pool, slot table, attention, sampler) and the executors that reach it."""
