"""`specq convert / inspect / export` through click's CliRunner (and one real subprocess).

Exit codes are part of the interface (specq.hub.errors): 0 ok, 2 usage, 3 checkpoint/disk,
4 newer format, 5 Hub, 6 export impossible, 7 model not loadable.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_tokenizer
from local_hub import LocalHub, hub_client_env
from specq.cli.main import main
from tiny_models import make_tiny_model

TOKEN = "hf_cli_test_token_abcdef123456"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A plain HF model directory (tiny llama + byte tokenizer) that `specq.load` reads."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny_model("llama", seed=4).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "ck"
    r = CliRunner().invoke(main, ["convert", str(tiny_dir), "--modes", "bf16,mxfp4,w4a16,w4a4", "--out", str(out),
                                  "--no-eval", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def test_convert_writes_a_checkpoint_that_loads_identically(converted, tiny_dir):
    import specq

    out, result = converted
    assert result["modes"] == ["bf16", "mxfp4", "w4a16", "w4a4"] and result["out"] == str(out)
    assert set(result["bytes_per_mode"]) == set(result["modes"])
    assert result["bytes_per_mode"]["mxfp4"] < result["bytes_per_mode"]["bf16"]
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    # the CLI's checkpoint is the library's: same model, same logits
    base, _ = specq.load(str(tiny_dir), dtype=torch.bfloat16)
    mm = specq.transform(base, modes=result["modes"])
    loaded = specq.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    with torch.no_grad():
        for m in result["modes"]:
            with specq.mode(mm, m), specq.mode(loaded, m):
                assert torch.equal(mm(ids).logits, loaded(ids).logits), m


def test_inspect_table_and_json(converted):
    out, result = converted
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]
    assert "format version  1" in r.stdout and f"recipe          {recipe}" in r.stdout
    assert "model.layers.0.self_attn.q_proj" in r.stdout and "keep" in r.stdout
    r = run("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["modes"] == result["modes"] and info["bytes_per_mode"] == result["bytes_per_mode"]
    plan = json.loads((out / "config.json").read_text())["quantization_config"]["plan"]
    assert info["format_version"] == 1 and len(info["layers"]) == len(plan["matmuls"]) == 15
    assert info["quantized_layers"] == sum(e["action"] == "quantize" for e in plan["matmuls"]) >= 14


def test_export_via_cli(converted, tmp_path):
    out, _ = converted
    r = run("export", out, "--format", "compressed-tensors", "--mode", "mxfp4", "--out", tmp_path / "mx", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "mxfp4-pack-quantized"
    r = run("export", out, "--mode", "w4a16", "--out", tmp_path / "w4")  # rotated by the default recipe
    assert r.exit_code == 6 and "Hadamard rotation" in r.stderr and not (tmp_path / "w4").exists()


def test_bad_input_gives_clear_errors_and_exit_codes(converted, tmp_path):
    out, _ = converted
    r = run("convert", tmp_path / "no-such-model", "--out", tmp_path / "x", "--no-eval", "--quiet")
    assert r.exit_code == 7 and "error:" in r.stderr and not (tmp_path / "x").exists()
    import transformers

    transformers.T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2, vocab_size=256).save_pretrained(
        tmp_path / "t5")  # an encoder-decoder: not a causal LM
    r = run("convert", tmp_path / "t5", "--out", tmp_path / "t5-out", "--no-eval", "--quiet")
    assert r.exit_code == 7 and "causal LM" in r.stderr and len(r.stderr) < 1500
    assert not (tmp_path / "t5-out").exists()
    r = run("convert", "--modes", "bf16,int3", "--out", tmp_path / "y")
    assert r.exit_code == 2 and "unknown mode" in r.stderr
    r = run("inspect", tmp_path)
    assert r.exit_code == 3 and "not a specq checkpoint" in r.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    for f in ("config.json", "model.safetensors.index.json"):
        (newer / f).write_text((out / f).read_text())
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (newer / "config.json").write_text(json.dumps(cfg))
    r = run("inspect", newer)
    assert r.exit_code == 4 and "Upgrade specq" in r.stderr


def test_convert_disk_full_exits_3_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "outdir"
    r = run("convert", tiny_dir, "--modes", "mxfp4", "--out", out, "--no-eval", "--quiet")
    assert r.exit_code == 3 and "No space left on device" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_with_eval_puts_measurements_on_the_card(tiny_dir, tmp_path):
    from specq.hub.convert import convert

    result = convert(str(tiny_dir), modes=("bf16", "mxfp4"), out=tmp_path / "ck", progress=False,
                     eval_kwargs={"texts": ["the quick brown fox jumps over the lazy dog " * 4],
                                  "prompts": ["hello", "tell me"], "max_new_tokens": 4, "max_length": 64})
    r = result.eval_results
    assert r["bf16"]["perplexity"] > 1 and 0 <= r["mxfp4"]["agreement"] <= 1 and r["mxfp4"]["verifier"] == "bf16"
    card = (tmp_path / "ck" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| mxfp4 |"))
    assert f"{r['mxfp4']['perplexity']:.4g}" in row and "(vs bf16)" in row
    assert "Measured by `specq eval`" in card


def test_convert_push_and_inspect_through_the_local_hub(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with LocalHub(tokens={TOKEN: {"me"}}) as hub, hub_client_env(hub, tmp_path / "cache"):
        r = run("convert", tiny_dir, "--modes", "mxfp4,w4a4", "--push-to-hub", "me/tiny-specq", "--private",
                "--no-eval", "--quiet", "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert result["out"] is None and result["repo_id"] == "me/tiny-specq"
        assert hub.repos["me/tiny-specq"].private and hub.commit_count("me/tiny-specq") == 2
        assert result["commit_sha"] == hub.repos["me/tiny-specq"].refs["main"]
        hub.downloads.clear()
        r = run("inspect", "me/tiny-specq", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["modes"] == ["mxfp4", "w4a4"]
        assert sorted(d.split(":")[1] for d in hub.downloads) == ["config.json", "model.safetensors.index.json"]
        r = run("convert", tiny_dir, "--modes", "mxfp4", "--push-to-hub", "someone-else/x", "--no-eval", "--quiet")
        assert r.exit_code == 5 and "Permission denied" in r.stderr and TOKEN not in r.output
        r = run("inspect", "me/does-not-exist")
        assert r.exit_code == 5 and "not found" in r.stderr
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("specq-convert-*/checkpoint"))


def test_real_subprocess_convert_and_inspect(tiny_dir, tmp_path):
    exe = Path(sys.executable).parent / "specq"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "specq.cli.main"]
    out = tmp_path / "ck"
    p = subprocess.run(cmd + ["convert", str(tiny_dir), "--modes", "w4a16", "--out", str(out), "--no-eval",
                              "--json"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["modes"] == ["w4a16"]
    assert "specq convert: quantizing" in p.stderr  # status lines go to stderr, JSON alone on stdout
    p = subprocess.run(cmd + ["inspect", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "error:" in p.stderr


def test_rerun_after_interrupted_push_resumes(tiny_dir, tmp_path, monkeypatch):
    """Conversion is deterministic (same bytes, same sha256), so re-running an interrupted
    `convert --push-to-hub` sends only the objects the first run did not."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ["convert", tiny_dir, "--modes", "bf16,mxfp4,w4a16", "--push-to-hub", "me/resume", "--quiet", "--no-eval"]
    with LocalHub(tokens={TOKEN: {"me"}}, lfs_threshold=4096) as hub, hub_client_env(hub, tmp_path / "cache"):
        hub.fail_lfs_puts_after = 1
        r = run(*args)
        assert r.exit_code == 5 and "Re-run the same command to resume" in r.stderr
        assert hub.commit_count("me/resume") == 1 and len(hub.lfs_puts) == 1
        first = set(hub.lfs_puts)
        hub.fail_lfs_puts_after = None
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert hub.commit_count("me/resume") == 2
        assert len(hub.lfs_puts) == len(set(hub.lfs_puts)) >= 3  # every LFS object sent exactly once
        assert first <= set(hub.lfs_puts)


def test_convert_with_w4a4_scale_levels(tiny_dir, tmp_path):
    """--w4a4-scale-levels reaches the plan, the checkpoint's format metadata and `specq inspect`; out of range
    is refused by click before any work."""
    out = tmp_path / "levels"
    r = run("convert", tiny_dir, "--modes", "w4a16,w4a4", "--w4a4-scale-levels", "16", "--out", out, "--no-eval",
            "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["formats"]["w4a4"]["scale_levels"] == [16]
    assert all(e.get("w4a4_scale_levels") == 16 for e in cfg["plan"]["matmuls"] if e["action"] == "quantize")
    r = run("inspect", out)
    assert r.exit_code == 0 and "w4a4 scale levels 16" in r.output, r.output
    r = run("convert", tiny_dir, "--w4a4-scale-levels", "17", "--out", tmp_path / "bad", "--no-eval")
    assert r.exit_code != 0 and "17" in r.output and not (tmp_path / "bad").exists()
