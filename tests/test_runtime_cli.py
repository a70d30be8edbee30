"""`specq generate`: streams the accepted text, prints stats, and --json gives the same tokens as
the library call."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from specq.cli.main import main


def test_generate_json_matches_library(default_model_fp32, default_tokenizer, encode_chat):
    import specq

    prompt = "Name three primary colors."
    res = CliRunner().invoke(main, ["generate", "--prompt", prompt, "--levels", "ngram,bf16", "--gamma", "3",
                                    "--max-new-tokens", "12", "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    ids = encode_chat(default_tokenizer, prompt)
    ref = specq.generate(default_model_fp32, ids, 12, levels=["bf16"])
    n = ref.num_new_tokens[0]
    assert data["tokens"] == ref.sequences[0, ids.shape[1]:ids.shape[1] + n].tolist()
    assert data["stats"]["levels"][0]["name"] == "ngram"
    assert data["text"] == default_tokenizer.decode(torch.tensor(data["tokens"]), skip_special_tokens=True)


def test_generate_streams_text_and_stats():
    res = CliRunner().invoke(main, ["generate", "--prompt", "Say hello.", "--levels", "ngram,bf16",
                                    "--max-new-tokens", "8", "--dtype", "float32", "--stats"])
    assert res.exit_code == 0, res.output
    assert "accept rate" in res.output and "tokens/s" in res.output


def test_generate_bad_levels_is_a_clear_error():
    res = CliRunner().invoke(main, ["generate", "--prompt", "x", "--levels", "ngram,bogus", "--max-new-tokens", "4",
                                    "--dtype", "float32"])
    assert res.exit_code != 0
    assert "unknown level" in res.output


def test_generate_compile_is_greedy_only():
    """--compile runs the compiled greedy path; sampling with it is refused before any model work."""
    res = CliRunner().invoke(main, ["generate", "--prompt", "x", "--levels", "ngram,bf16", "--max-new-tokens", "4",
                                    "--dtype", "float32", "--compile", "inductor", "--temperature", "0.7"])
    assert res.exit_code != 0
    assert "greedily" in res.output
