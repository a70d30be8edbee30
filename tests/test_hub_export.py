"""Export to compressed-tensors: layout and config checked against the format definition by hand.

compressed-tensors `pack-quantized` (W4A16): per quantized Linear, `weight_packed` int32 [N, K/8]
holding q + 8 in nibbles, element 8j+i in bits 4i..4i+3 of word j; `weight_scale` [N, K/group];
`weight_shape` [2]. `mxfp4-pack-quantized`: `weight_packed` uint8 [N, K/2], element 2i in the low
nibble (E2M1 code: sign bit 3, magnitude index into [0, .5, 1, 1.5, 2, 3, 4, 6]), `weight_scale`
uint8 E8M0 [N, K/32] (2^(s-127)). The expected words and bytes below are written out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import specq
from specq.hub.errors import ExportError
from specq.hub.export import export_compressed_tensors
from tiny_models import make_tiny_model

NO_ROTATION = {"name": "norot", "base": "default", "had_block": 0}
Q = "model.layers.0.self_attn.q_proj"


def hand_model():
    """A tiny llama whose q_proj row 0 has known quantized values in both formats."""
    model = make_tiny_model("llama", seed=3)
    with torch.no_grad():
        w = model.get_submodule(Q).weight  # [64, 64], one INT4 group of 64 per row
        w[0].zero_()
        w[0, :8] = torch.tensor([7, -7, 1, 0, 2, -3, 4, 5]) * 0.125  # INT4: scale 0.125, q as written
        w[1].zero_()
        w[1, :8] = torch.tensor([6, -6, 0.5, 1, 1.5, 2, 3, 4])  # MXFP4 block 0: amax 6 -> exponent 0
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, reference


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, ref = hand_model()
    plain = specq.save_pretrained(specq.transform(model, modes=("bf16", "mxfp4", "w4a16"), recipe=NO_ROTATION),
                                  root / "plain")
    rotated_model, _ = hand_model()
    rotated = specq.save_pretrained(specq.transform(rotated_model, modes=("bf16", "w4a16")), root / "rotated")
    return {"plain": plain, "rotated": rotated, "ref": ref, "root": root}


def nibble_word(values):
    word = 0
    for i, v in enumerate(values):
        word |= (v + 8) << (4 * i)
    return word - (1 << 32) if word >= (1 << 31) else word  # as a signed int32


def test_w4a16_pack_quantized_layout_and_config(checkpoints):
    out = export_compressed_tensors(checkpoints["plain"], checkpoints["root"] / "w4a16", "w4a16")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    groups = {g["weights"]["group_size"]: g for g in q["config_groups"].values()}
    assert set(groups) == {64, 128}  # K=64 matmuls use group 64, down_proj (K=128) group 128
    for g in groups.values():
        w = g["weights"]
        assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["dynamic"]) == (4, "int", True, "group", False)
        assert g["format"] == "pack-quantized" and g["input_activations"] is None
    assert Q in groups[64]["targets"] and "model.layers.1.mlp.down_proj" in groups[128]["targets"]
    assert sum(len(g["targets"]) for g in groups.values()) == 14

    t = load_file(out / "model.safetensors")
    assert f"{Q}.weight" not in t and "lm_head.weight" in t and "model.embed_tokens.weight" in t
    packed, scale, shape = t[f"{Q}.weight_packed"], t[f"{Q}.weight_scale"], t[f"{Q}.weight_shape"]
    assert packed.dtype == torch.int32 and packed.shape == (64, 8)
    assert scale.shape == (64, 1) and scale.dtype == torch.float32
    assert shape.dtype == torch.int32 and shape.tolist() == [64, 64]
    # row 0, by hand: q = [7, -7, 1, 0, 2, -3, 4, 5] in word 0, zeros (stored as 8) after, scale 0.125
    assert packed[0, 0].item() == nibble_word([7, -7, 1, 0, 2, -3, 4, 5])
    assert packed[0, 1:].tolist() == [nibble_word([0] * 8)] * 7
    assert scale[0, 0].item() == 0.125
    # every row: decoding the words by the definition reconstructs the original weight within scale/2
    words = packed.to(torch.int64) & 0xFFFFFFFF
    q_vals = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(64, 64) - 8
    w_hat = q_vals.double() * scale.double()
    w = checkpoints["ref"][f"{Q}.weight"].double()
    assert (w_hat - w).abs().max() <= scale.double().max() / 2 + 1e-6
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                               "README.md"}


def test_mxfp4_pack_quantized_layout_and_config(checkpoints):
    out = export_compressed_tensors(checkpoints["plain"], checkpoints["root"] / "mxfp4", "mxfp4")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "mxfp4-pack-quantized" and len(q["config_groups"]) == 1
    g = q["config_groups"]["group_0"]
    assert (g["weights"]["num_bits"], g["weights"]["type"], g["weights"]["group_size"]) == (4, "float", 32)
    assert g["format"] == "mxfp4-pack-quantized"
    t = load_file(out / "model.safetensors")
    packed, scale = t[f"{Q}.weight_packed"], t[f"{Q}.weight_scale"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 32)
    assert scale.dtype == torch.uint8 and scale.shape == (64, 2)
    assert f"{Q}.weight_shape" not in t
    # row 1, by hand: [6, -6, .5, 1, 1.5, 2, 3, 4] -> codes 7, 15, 1, 2, 3, 4, 5, 6, two per byte, low first
    assert packed[1, :4].tolist() == [0xF7, 0x21, 0x43, 0x65]
    assert packed[1, 4:16].tolist() == [0] * 12
    assert scale[1].tolist() == [127, 0]  # 2^0; an all-zero block gets the smallest exponent (2^-127)
    # every row: decode by the definition, compare with the original weight (MXFP4 error <= 1/4 of block scale*2)
    lut = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(64, 64).long()
    vals = lut[codes & 7] * torch.where(codes & 8 > 0, -1.0, 1.0).double()
    w_hat = vals * torch.pow(2.0, scale.double() - 127).repeat_interleave(32, dim=1)
    w = checkpoints["ref"][f"{Q}.weight"].double()
    blocks = w.abs().reshape(64, 2, 32).amax(-1).repeat_interleave(32, dim=1)
    assert ((w_hat - w).abs() <= blocks / 4 + 1e-9).all()


def test_rotated_w4a16_is_refused_or_requantized(checkpoints):
    root = checkpoints["root"]
    with pytest.raises(ExportError, match="Hadamard rotation.*vLLM.*--requantize"):
        export_compressed_tensors(checkpoints["rotated"], root / "refused", "w4a16")
    assert not (root / "refused").exists()
    out = export_compressed_tensors(checkpoints["rotated"], root / "requant", "w4a16", requantize=True)
    t = load_file(out / "model.safetensors")
    packed, scale = t[f"{Q}.weight_packed"], t[f"{Q}.weight_scale"]
    assert packed[0, 0].item() == nibble_word([7, -7, 1, 0, 2, -3, 4, 5])  # the UNrotated weight, by hand
    assert "plain W4A16" in (out / "README.md").read_text()


def test_export_errors(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="does not hold mode 'mxfp4'"):
        export_compressed_tensors(checkpoints["rotated"], tmp_path / "a", "mxfp4")
    with pytest.raises(ExportError, match="supports modes w4a16, mxfp4"):
        export_compressed_tensors(checkpoints["plain"], tmp_path / "b", "w4a4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_compressed_tensors(checkpoints["plain"], tmp_path / "full", "mxfp4")
    gpt2 = specq.save_pretrained(specq.transform(make_tiny_model("gpt2"), modes=("mxfp4",)), tmp_path / "gpt2")
    with pytest.raises(ExportError, match="Conv1D"):
        export_compressed_tensors(gpt2, tmp_path / "c", "mxfp4")


def test_tied_embeddings_are_exported_once(tmp_path):
    mm = specq.transform(make_tiny_model("gemma3", seed=1), modes=("mxfp4",))  # lm_head tied to the embedding
    ck = specq.save_pretrained(mm, tmp_path / "ck")
    out = export_compressed_tensors(ck, tmp_path / "out", "mxfp4")
    t = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "model.embed_tokens.weight" in t and "lm_head.weight" not in t
    assert "model.layers.0.mlp.down_proj.weight_packed" in t


def test_large_exports_are_sharded_with_an_index(checkpoints, tmp_path):
    out = export_compressed_tensors(checkpoints["plain"], tmp_path / "sharded", "mxfp4", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    tensors = {}
    for f in shards:
        tensors.update(load_file(out / f))
    assert set(tensors) == set(index["weight_map"])
    single = load_file(export_compressed_tensors(checkpoints["plain"], tmp_path / "single", "mxfp4")
                       / "model.safetensors")
    assert set(single) == set(tensors) and all(torch.equal(single[k], tensors[k]) for k in single)
