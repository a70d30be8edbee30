"""Shared pytest fixtures.

- tests/ is put on sys.path, so test modules can `from tiny_models import make_tiny_model`.
- `default_model_fp32` / `default_tokenizer`: the embedded default model (SmolLM2-135M-Instruct),
  loaded once per session in float32 (greedy token equality is asserted in float32; see DESIGN.md).
  Tests that transform a model in place must deep-copy it first (`copy.deepcopy(default_model_fp32)`),
  since the fixture is shared by the whole session.
- `default_multimode_fp32`: a deep copy of it, `specq.transform`ed to all four modes (default
  recipe), built once per session (~20 s); shared too: switch modes with `specq.mode(...)` only.
- `tiny_model`: factory for fresh tiny random models, `tiny_model("llama", dtype=..., seed=...)`.
- `tiny_tokenizer`: a byte-level tokenizer whose 256 ids fit the tiny models' vocabulary (no chat
  template, no special tokens), for saving a tiny model as a loadable directory.
- `encode_chat`: `encode_chat(tokenizer, "question")` -> input_ids [1, T] with the chat template.
- `sass_report`: benchmarks/sass_report.py (sm_90 compilation and SASS counts with the ptxas /
  nvdisasm of Triton's wheel, ``.PTXAS`` the ptxas path); skips where the wheel carries none.
- Tests marked `gpu` are skipped where CUDA is unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture(scope="session")
def sass_report():
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, b)) for b in ("ptxas", "nvdisasm")):
        pytest.skip("this triton wheel carries no ptxas/nvdisasm")
    path = os.path.join(os.path.dirname(TESTS_DIR), "benchmarks", "sass_report.py")
    spec = importlib.util.spec_from_file_location("sass_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PTXAS = os.path.join(bin_dir, "ptxas")
    return mod


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def _default_pair_fp32():
    import specq

    model, tokenizer = specq.load(dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def default_model_fp32(_default_pair_fp32):
    """SmolLM2-135M-Instruct in float32, eval mode, shared by the session: do not modify in place."""
    return _default_pair_fp32[0]


@pytest.fixture(scope="session")
def default_tokenizer(_default_pair_fp32):
    return _default_pair_fp32[1]


@pytest.fixture(scope="session")
def default_multimode_fp32(default_model_fp32, default_calibration_ids):
    """The default model transformed to ("bf16", "mxfp4", "w4a16", "w4a4"), float32; do not modify."""
    import copy

    import specq

    return specq.transform(copy.deepcopy(default_model_fp32), modes=("bf16", "mxfp4", "w4a16", "w4a4"),
                           calibration_ids=default_calibration_ids)


@pytest.fixture(scope="session")
def default_eval_ids(default_tokenizer):
    """The first 256 tokens of the shipped eval text, [1, 256]."""
    from specq.evaluation import load_eval_texts

    text = "\n\n".join(t for _, t in load_eval_texts())
    ids = default_tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    assert ids.shape[1] == 256
    return ids


@pytest.fixture(scope="session")
def default_calibration_ids(default_eval_ids):
    """Explicit MXFP4 calibration tokens (the eval window's second half): transform then skips sampling
    its own calibration text, which costs a minute on 2 CPU cores."""
    return default_eval_ids[:, 128:]


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model(family, dtype=torch.float32, seed=0)` -> a fresh tiny random model."""
    from tiny_models import make_tiny_model

    return make_tiny_model


def make_tiny_tokenizer():
    """Byte-level BPE with no merges: one id per byte (0..255), so any text fits a 256-token vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def _encode_chat(tokenizer, text: str, system: str | None = None) -> torch.Tensor:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return out["input_ids"]


@pytest.fixture(scope="session")
def encode_chat():
    """`encode_chat(tokenizer, text, system=None)` -> input_ids [1, T] (chat template, generation prompt)."""
    return _encode_chat
