"""Kestrel: a fast LLM inference and serving engine.

    from kestrel import LLM, SamplingParams
"""

from kestrel.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import the engine lazily: `import kestrel` stays light (no torch) for the frontend processes.
    if name == "LLM":
        from kestrel.llm import LLM

        return LLM
    raise AttributeError(f"module 'kestrel' has no attribute {name!r}")
