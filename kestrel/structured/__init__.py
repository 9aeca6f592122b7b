"""Grammar-constrained decoding on the engine side (xgrammar): compiled grammars, per-request matchers.

    StructuredOutputsParams --compile (LRU by text)--> CompiledGrammar --per request--> GrammarMatcher
    matcher --fill--> packed token bitmask in the SampleRow --worker--> logits of disallowed ids = -inf
    sampled token --Scheduler.update--> matcher.accept --> jump-forward tokens appended

The worker never sees a matcher: it gets each constrained row's bitmask as bytes
(`kestrel.worker.logits_processors.GrammarBitmask`). See docs/architecture.md, "Structured outputs".
"""
from kestrel.structured.manager import StructuredOutputManager  # imports xgrammar on first use only

__all__ = ["StructuredOutputManager"]
