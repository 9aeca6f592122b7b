"""Model architectures, the registry from HF `architectures` names, and the loader."""
