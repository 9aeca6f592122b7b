"""Frontend: tokenizer, chat template, incremental detokenizer (no torch)."""
