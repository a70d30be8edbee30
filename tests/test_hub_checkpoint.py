"""save_pretrained / from_pretrained: layout, logit-exact round trips, partial loading, faults.

The reference for "loaded == converted" is the converted model itself: every mode's logits must be
bit-identical (float32 tiny models, and the bf16 default model), since loading never re-quantizes.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import specq
from specq.hub.errors import CheckpointError, FormatVersionError
from specq.hub.layout import INDEX_FILE, file_sha256
from tiny_models import make_tiny_model

ALL = ("bf16", "mxfp4", "w4a16", "w4a4")
# llama: plain; qwen2: q/k/v biases; gpt2: Conv1D [in, out] + tied lm_head;
# phi3: fused qkv/gate_up
FAMILIES = ("llama", "qwen2", "gpt2", "phi3")


def logits_per_mode(model, ids, modes):
    out = {}
    with torch.no_grad():
        for m in modes:
            with specq.mode(model, m):
                out[m] = model(ids).logits
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (transformed model, checkpoint dir), all four modes."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for fam in FAMILIES:
        mm = specq.transform(make_tiny_model(fam, seed=1), modes=ALL)
        path = specq.save_pretrained(mm, root / fam)
        out[fam] = (mm, path)
    return out


IDS = torch.tensor([[1, 17, 99, 3, 250, 42, 7, 128, 64, 5]])


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_logit_exact_in_every_mode(converted, family):
    mm, path = converted[family]
    loaded = specq.from_pretrained(path)
    assert specq.get_mode(loaded) == "bf16"
    want, got = logits_per_mode(mm, IDS, ALL), logits_per_mode(loaded, IDS, ALL)
    for m in ALL:
        assert torch.equal(want[m], got[m]), (family, m)
    # the modes really differ (the comparison above is not trivially true)
    assert not torch.equal(want["bf16"], want["mxfp4"]) and not torch.equal(want["w4a16"], want["w4a4"])


def test_layout_config_and_index(converted):
    mm, path = converted["llama"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", INDEX_FILE, "generation_config.json", "README.md"} <= names
    index = json.loads((path / INDEX_FILE).read_text())
    groups = {meta["group"] for meta in index["files"].values()}
    assert groups == {"common", "bf16", "mxfp4", "int4"}
    for name, meta in index["files"].items():  # checksums and sizes are those of the files
        assert file_sha256(path / name) == meta["sha256"] and (path / name).stat().st_size == meta["size"]
    wm = index["weight_map"]
    q_proj = "model.layers.0.self_attn.q_proj"
    assert index["files"][wm[f"{q_proj}.weight"]]["group"] == "bf16"
    assert index["files"][wm[f"{q_proj}.mxfp4_packed"]]["group"] == "mxfp4"
    assert index["files"][wm[f"{q_proj}.int4_scales"]]["group"] == "int4"  # one INT4 copy for w4a16 and w4a4
    assert index["files"][wm["model.embed_tokens.weight"]]["group"] == "common"
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "specq" and q["format_version"] == 1 and q["modes"] == list(ALL)
    assert q["formats"]["mxfp4"]["block_size"] == 32 and q["formats"]["w4a4"]["act_group_sizes"] == [32]
    plan = mm.specq_plan
    quantized = [e for e in plan["matmuls"] if e["action"] == "quantize"]
    assert q["group_sizes"]["int4"] == sorted({e["int4_group_size"] for e in quantized}) and q["recipe"] == plan["recipe"]
    assert q["rotation"]["type"] == "hadamard" and q["rotation"]["block_sizes"] == sorted({e["had_block"] for e in quantized})
    assert q["plan"] == mm.specq_plan
    card = (path / "README.md").read_text()
    assert "library_name: \"specq\"" in card and "| w4a4 |" in card


def test_only_requested_modes_are_written(tmp_path):
    mm = specq.transform(make_tiny_model("llama", seed=2), modes=("mxfp4", "w4a4"))
    path = specq.save_pretrained(mm, tmp_path / "ck")
    index = json.loads((path / INDEX_FILE).read_text())
    assert {m["group"] for m in index["files"].values()} == {"common", "mxfp4", "int4"}
    assert not any(k.endswith("q_proj.weight") for k in index["weight_map"])  # no float copy of quantized matmuls
    loaded = specq.from_pretrained(path)
    with pytest.raises(ValueError, match="not available"):
        specq.set_mode(loaded, "bf16")
    for m in ("mxfp4", "w4a4"):
        assert torch.equal(logits_per_mode(mm, IDS, [m])[m], logits_per_mode(loaded, IDS, [m])[m])
    with pytest.raises(CheckpointError, match=r"does not hold mode\(s\) \['bf16'\]"):
        specq.from_pretrained(path, modes=["bf16"])


def test_loading_a_subset_reads_only_its_shards(converted, tmp_path, monkeypatch):
    import shutil

    import safetensors

    mm, src = converted["qwen2"]
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    index = json.loads((path / INDEX_FILE).read_text())
    for name, meta in index["files"].items():  # remove what w4a16 does not need: loading must not notice
        if meta["group"] in ("bf16", "mxfp4"):
            (path / name).unlink()
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, *a, **k: opened.append(os.path.basename(p)) or real(p, *a, **k))
    loaded = specq.from_pretrained(path, modes=["w4a16"])
    assert {index["files"][n]["group"] for n in opened} == {"common", "int4"}
    assert specq.get_mode(loaded) == "w4a16"
    assert torch.equal(logits_per_mode(mm, IDS, ["w4a16"])["w4a16"], loaded(IDS).logits.detach())
    with pytest.raises(CheckpointError, match="is missing"):
        specq.from_pretrained(path, modes=["mxfp4"])


def test_corrupt_truncated_and_missing_shards_are_detected(converted, tmp_path):
    import shutil

    _, src = converted["llama"]
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    index = json.loads((path / INDEX_FILE).read_text())
    shard = next(n for n, m in index["files"].items() if m["group"] == "mxfp4")
    data = bytearray((path / shard).read_bytes())
    data[-5] ^= 0x40  # one flipped bit inside a tensor
    (path / shard).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 checksum"):
        specq.from_pretrained(path)
    specq.from_pretrained(path, modes=["bf16"])  # other modes still load
    (path / shard).write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        specq.from_pretrained(path, modes=["mxfp4"])
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        specq.from_pretrained(path, modes=["mxfp4"])


def test_newer_format_version_and_non_specq_dirs_are_refused(converted, tmp_path):
    import shutil

    _, src = converted["llama"]
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatVersionError, match="format version 99.*Upgrade specq"):
        specq.from_pretrained(path)
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a specq checkpoint"):
        specq.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a specq checkpoint"):
        specq.from_pretrained(tmp_path)  # no config.json at all
    with pytest.raises(CheckpointError, match="No such checkpoint directory"):
        specq.from_pretrained(str(tmp_path / "nope" / "deeper"))


def test_disk_full_mid_write_leaves_nothing_behind(converted, tmp_path, monkeypatch):
    import safetensors.torch

    mm, _ = converted["llama"]
    real = safetensors.torch.save_file
    calls = []

    def save_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second shard: write part of it, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="No space left on device.*Nothing was written"):
        specq.save_pretrained(mm, out)
    assert len(calls) == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_existing_directories(converted, tmp_path):
    mm, _ = converted["gpt2"]
    out = tmp_path / "out"
    specq.save_pretrained(mm, out)
    first = json.loads((out / INDEX_FILE).read_text())
    specq.save_pretrained(mm, out)  # replacing a specq checkpoint is fine (atomic swap)
    assert json.loads((out / INDEX_FILE).read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a specq checkpoint; refusing"):
        specq.save_pretrained(mm, other)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="specq.transform"):
        specq.save_pretrained(make_tiny_model("gpt2"), tmp_path / "plain")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_auto_model_loads_a_specq_checkpoint(converted, family):
    import transformers

    mm, path = converted[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "quantization_method", None) == "specq"
    want, got = logits_per_mode(mm, IDS, ALL), logits_per_mode(model, IDS, ALL)
    for m in ALL:
        assert torch.equal(want[m], got[m]), (family, m)


def test_import_specq_registers_the_quantizer_without_importing_transformers():
    import subprocess
    import sys

    code = ("import sys, specq; assert 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
            "print(M['specq'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SpecqHfQuantizer"


@pytest.mark.slow
def test_default_model_round_trip(default_multimode_fp32, default_tokenizer, tmp_path):
    mm, tok = default_multimode_fp32, default_tokenizer  # session fixtures (conftest.py), shared: not modified
    path = specq.save_pretrained(mm, tmp_path / "smollm2", tokenizer=tok,
                                 base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (path / "tokenizer_config.json").is_file()
    card = (path / "README.md").read_text()
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in card and 'base_model_relation: "quantized"' in card
    loaded = specq.from_pretrained(path)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight.data_ptr() == \
        loaded.model.embed_tokens.weight.data_ptr()  # stored once, tied again on load
    ids = torch.tensor([tok.encode("The capital of France is")])
    want, got = logits_per_mode(mm, ids, ALL), logits_per_mode(loaded, ids, ALL)
    for m in ALL:
        assert torch.equal(want[m], got[m]), m
