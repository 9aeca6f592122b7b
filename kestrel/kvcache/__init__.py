"""KV memory: slot allocator (bookkeeping), request->slot table, and the tensor pool."""
