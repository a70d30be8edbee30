"""Tiny random causal LMs of many families, built from transformers config classes.

2 layers, small hidden sizes that are multiples of 64 (so every quantized format and the 64-wide
Hadamard blocks apply), deterministic weights from a seed. Used by transform, runtime and hub tests.
"""

from __future__ import annotations

import torch

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POS = 512

# family -> (config class name, model class name, config kwargs)
_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(  # q/k/v projections carry biases
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16, max_position_embeddings=MAX_POS)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        sliding_window=None)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(  # tied lm_head
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16, max_position_embeddings=MAX_POS,
        sliding_window=128)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(  # fused qkv_proj and gate_up_proj
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(  # Conv1D weights [in, out], addmm
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(  # biases on every linear
        hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, pad_token_id=1)),
}

TINY_FAMILIES = tuple(_SPECS)


def make_tiny_config(family: str):
    import transformers

    if family not in _SPECS:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config_cls, _, kwargs = _SPECS[family]
    ids = dict(bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
    return getattr(transformers, config_cls)(vocab_size=VOCAB, **{**ids, **kwargs})


def make_tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A freshly initialised tiny model of `family` in eval mode, deterministic for a given seed."""
    import transformers

    config = make_tiny_config(family)
    model_cls = getattr(transformers, _SPECS[family][1])
    torch.manual_seed(seed)
    model = model_cls(config)
    # HF init uses std 0.02; widen it a little so tiny models have non-trivial argmax structure.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.to(dtype).eval()
