"""KV memory: slot allocator and prefix cache (bookkeeping), request->slot holdings, and the tensor pool."""
