"""Speculative runtime: shared static KV cache, drafters, verification, the multi-level loop."""
