"""Batched benchmark rows (specq/runtime/bench.py, benchmarks/e2e.py): per-row acceptance at batch > 1
gives the target's tokens row for row (float32, tiny llama), e2e.py states the batch it ran, and the
implied speed counts every row's tokens."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch

from specq.runtime import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def multimode():
    import specq
    from tiny_models import make_tiny_model

    # the data-free "mse" MXFP4 rule: no calibration text per transform (as in test_compiled.py)
    recipe = {"name": "default-mse", "base": "default", "mxfp4_scale_rule": "mse"}
    return specq.transform(copy.deepcopy(make_tiny_model("llama", seed=1)),
                           modes=("bf16", "mxfp4", "w4a16", "w4a4"), recipe=recipe)


def test_run_rows_batch3_per_row_equals_target(multimode):
    """Batch 3, per_row=True: the two-level rows (mlspecqd2, qspec) ran per-row and give their
    target's autoregressive tokens in every row; the autoregressive rows did not run per-row."""
    ids = bench.make_prompt(multimode, None, 12, batch=3, seed=3)
    assert ids.shape == (3, 12) and len({tuple(r) for r in ids.tolist()}) == 3  # different rows
    new = 14
    rows = bench.run_rows(multimode, ids, new, rows=["hf_eager", "ar_bf16", "mlspecqd2", "ar_w4a16", "qspec"],
                          gamma={"mlspecqd2": 3, "qspec": 3}, compile=None, strict=True, per_row=True,
                          log=lambda *a: None)
    by = {r.name: r for r in rows}
    assert all(r.error is None and r.new_tokens == 3 * new for r in rows)
    assert [by[n].per_row for n in ("hf_eager", "ar_bf16", "mlspecqd2", "ar_w4a16", "qspec")] == \
        [False, False, True, False, True]
    assert torch.equal(by["ar_bf16"].sequences, by["hf_eager"].sequences)
    assert torch.equal(by["mlspecqd2"].sequences, by["hf_eager"].sequences)
    assert torch.equal(by["qspec"].sequences, by["ar_w4a16"].sequences)
    assert by["qspec"].same_as == "ar_w4a16" and by["qspec"].agree == new
    assert by["qspec"].forwards["w4a16"] >= 1 and "w4a4" in by["qspec"].acceptance
    assert by["qspec"].as_dict()["per_row"] is True and "sequences" not in by["qspec"].as_dict()
    table = bench.markdown_table(rows, baseline="hf_eager")
    assert table.splitlines()[0].endswith("| per-row |") and "| qspec |" in table
    assert table.count("\n") == len(rows) + 1
    qline = next(line for line in table.splitlines() if line.startswith("| qspec |"))
    assert qline.endswith("| yes |")
    # batch 1 (or per_row off): no per-row rows, and the table keeps its batch-1 columns
    one = bench.run_rows(multimode, ids[:1], 6, rows=["ar_w4a16", "qspec"], gamma={"qspec": 3}, compile=None,
                         strict=True, per_row=True, log=lambda *a: None)
    assert not any(r.per_row for r in one)
    assert "per-row" not in bench.markdown_table(one)


def test_make_prompt_rows_differ(tiny_tokenizer):
    """With a tokenizer, every row of a batch is a different cut of the default text; row 0 is the
    batch-1 prompt."""
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama")
    one = bench.make_prompt(model, tiny_tokenizer, 40)
    four = bench.make_prompt(model, tiny_tokenizer, 40, batch=4)
    assert one.shape == (1, 40) and four.shape == (4, 40)
    assert torch.equal(four[0], one[0])
    assert len({tuple(r) for r in four.tolist()}) == 4
    text = tiny_tokenizer(bench.DEFAULT_PROMPT).input_ids
    assert one[0].tolist() == text[:40]


def _e2e():
    spec = importlib.util.spec_from_file_location("e2e_bench", os.path.join(ROOT, "benchmarks", "e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_e2e_batch3_per_row(tmp_path, capsys):
    e2e = _e2e()
    e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "3", "--rows",
              "ar_bf16,mlspecqd2", "--new-tokens", "12", "--prompt-len", "16", "--strict", "--out", str(tmp_path)])
    md = (tmp_path / "e2e_tiny_cpu.md").read_text()
    data = json.loads((tmp_path / "e2e_tiny_cpu.json").read_text())
    assert "- batch 3, per-row acceptance on, prompt 16 tokens, 12 new tokens per row" in md
    assert data["meta"]["batch"] == 3 and data["meta"]["per_row"] is True
    by = {r["name"]: r for r in data["rows"]}
    assert by["mlspecqd2"]["per_row"] is True and by["ar_bf16"]["per_row"] is False
    assert by["mlspecqd2"]["new_tokens"] == 36 and by["mlspecqd2"]["agree"] == 12
    # --no-per-row: the same rows with one position for the batch
    e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "3", "--no-per-row",
              "--rows", "mlspecqd2", "--new-tokens", "6", "--prompt-len", "8", "--out", str(tmp_path),
              "--tag", "off"])
    md = (tmp_path / "e2e_off.md").read_text()
    assert "- batch 3, per-row acceptance off," in md
    assert json.loads((tmp_path / "e2e_off.json").read_text())["rows"][0]["per_row"] is False


def test_e2e_implied_from_needs_the_real_batch(tmp_path):
    """--implied-from refuses step costs at another batch than the real run's (old JSONs: batch 1)."""
    e2e = _e2e()
    real = tmp_path / "real.json"
    real.write_text(json.dumps(dict(meta=dict(batch=32, new_tokens=8), rows=[])))
    with pytest.raises(SystemExit):
        e2e.main(["--model", "tiny", "--device", "cpu", "--steps", "--step-batches", "1", "--implied-from",
                  str(real), "--out", str(tmp_path)])
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(meta=dict(new_tokens=8), rows=[])))
    with pytest.raises(SystemExit):
        e2e.main(["--model", "tiny", "--device", "cpu", "--steps", "--step-batches", "32", "--implied-from",
                  str(old), "--out", str(tmp_path)])


def test_implied_speed_counts_every_row():
    """Forwards x ms per forward (of the whole batch) -> new_tokens x batch tokens; per-row rows take
    the '@rows' step costs where given."""
    real = [dict(name="qspec", tokens_per_s=1.0, forwards={"w4a4": 40, "w4a16": 12}),
            dict(name="ar_w4a16", tokens_per_s=1.0, forwards={"w4a16": 32}),
            dict(name="qspec_rows", tokens_per_s=1.0, per_row=True, forwards={"w4a4": 40, "w4a16": 12}),
            dict(name="failed", tokens_per_s=None, forwards={"w4a16": 1})]
    costs = {"w4a4": 1.0, "w4a16": 2.0, "w4a16@verify": 2.5, "w4a16@verify@rows": 3.0}
    one = bench.implied_speed(real, costs, 32)
    two = bench.implied_speed(real, costs, 32, batch=2)
    # qspec: 40 x 1.0 + 12 x 2.5 = 70 ms; ar: 32 x 2.0 = 64 ms; per-row qspec: 40 x 1.0 + 12 x 3.0 = 76 ms
    assert one == pytest.approx({"qspec": 32 / 0.070, "ar_w4a16": 500.0, "qspec_rows": 32 / 0.076})
    assert two == pytest.approx({"qspec": 914.2857142857, "ar_w4a16": 1000.0, "qspec_rows": 842.1052631579})


def test_e2e_implied_uses_the_real_batch_and_per_row_steps(tmp_path, monkeypatch):
    """The implied table of e2e.py (step costs faked: step_costs needs CUDA): costs at the real run's
    batch, the '@rows' costs (timed with row positions) for its per-row rows, the W4A4 draft step,
    and new_tokens x batch tokens."""
    e2e = _e2e()
    timed = []

    def fake_step_costs(model, batch=1, shapes=(), compile=None, position=0, log=print, row_positions=False):
        timed.append((batch, row_positions, tuple(shapes)))
        suffix = " per-row" if row_positions else ""
        ms = {"w4a4": 1.0, "w4a16": 2.0}
        out = []
        for s in shapes:
            if s[0] == "round":
                continue
            cost = ms.get(s[0], 9.0) * (1 if s[1] == 1 else 1.25) * (1.2 if row_positions else 1) * batch
            out.append(dict(step=f"{s[0]} q={s[1]}{suffix}", batch=batch, ms=cost, per_row=row_positions))
        return out

    monkeypatch.setattr(e2e.bench, "step_costs", fake_step_costs)
    real = tmp_path / "real.json"
    real.write_text(json.dumps(dict(meta=dict(batch=2, per_row=True, new_tokens=32, gamma={"qspec": 4}), rows=[
        dict(name="qspec@inductor", tokens_per_s=1.0, per_row=True, forwards={"w4a4": 40, "w4a16": 12}),
        dict(name="ar_w4a16@inductor", tokens_per_s=1.0, per_row=False, forwards={"w4a16": 32})])))
    e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--rows", "ar_w4a16,qspec",
              "--new-tokens", "4", "--prompt-len", "8", "--steps", "--step-batches", "1,2", "--implied-from",
              str(real), "--out", str(tmp_path), "--tag", "shape"])
    assert [(b, r) for b, r, _ in timed] == [(1, False), (2, False), (2, True)]
    data = json.loads((tmp_path / "e2e_shape.json").read_text())
    # batch 2: w4a4 q=1 2.0 ms, w4a16 q=1 4.0 ms; per-row: w4a4 2.4 ms, w4a16 q=5 2 x 2 x 1.25 x 1.2 = 6.0 ms
    assert data["implied_costs"]["w4a4"] == 2.0 and data["implied_costs"]["w4a16@verify@rows"] == pytest.approx(6.0)
    # qspec: 40 x 2.4 + 12 x 6.0 = 168 ms for 64 tokens; ar: 32 x 4.0 = 128 ms for 64 tokens
    assert data["implied"] == pytest.approx({"qspec@inductor": 64 / 0.168, "ar_w4a16@inductor": 500.0})
    md = (tmp_path / "e2e_shape.md").read_text()
    assert "batch 2, per-row on, 32 new tokens per row" in md and "| qspec@inductor | 381.0 |" in md


def test_e2e_step_shapes_are_parsed_and_refused_clearly():
    import argparse

    e2e = _e2e()
    p = argparse.ArgumentParser()
    assert e2e.parse_step_shape("w4a16:5", p) == ("w4a16", 5)
    assert e2e.parse_step_shape(" round:w4a4:w4a16:4", p) == ("round", "w4a4", "w4a16", 4)
    for bad in ("w4a16", "fp8:1", "round:w4a4:w4a16", "bf16:x"):
        with pytest.raises(SystemExit):
            e2e.parse_step_shape(bad, p)


def test_e2e_lm_head_modes_reach_the_transform(tmp_path):
    """--lm-head-modes mxfp4 reaches specq.transform (the mxfp4 row runs with the quantized head) and
    the table and JSON state it."""
    e2e = _e2e()
    e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--rows", "ar_mxfp4", "--new-tokens", "4",
              "--prompt-len", "8", "--lm-head-modes", "mxfp4", "--out", str(tmp_path), "--tag", "head"])
    md = (tmp_path / "e2e_head.md").read_text()
    data = json.loads((tmp_path / "e2e_head.json").read_text())
    assert "output head quantized in mxfp4" in md and data["meta"]["lm_head_modes"] == "mxfp4"
    assert data["rows"][0]["tokens_per_s"] and data["rows"][0]["error"] is None


def test_e2e_recipe_set_reaches_the_transform(tmp_path):
    """--recipe-set KEY=VALUE overrides the model's recipe (here QSpec on W4A4 with scale levels, greedy and
    lossless: --strict) and is recorded in the JSON; an unknown key is refused."""
    e2e = _e2e()
    e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--rows", "ar_w4a16,qspec",
              "--new-tokens", "8", "--prompt-len", "8", "--strict", "--recipe-set", "w4a4_scale_levels=16",
              "--recipe-set", "act_group_size=32", "--out", str(tmp_path), "--tag", "levels"])
    data = json.loads((tmp_path / "e2e_levels.json").read_text())
    assert data["meta"]["recipe_set"] == ["w4a4_scale_levels=16", "act_group_size=32"]
    with pytest.raises(SystemExit):
        e2e.main(["--model", "tiny", "--device", "cpu", "--rows", "qspec", "--recipe-set", "no_such_key=1",
                  "--out", str(tmp_path)])
