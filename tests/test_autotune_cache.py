"""The autotuner's disk cache (specq.kernels.triton_common.DiskCache): a winner timed by one process is
used by the next one on the same GPU model without timing, only while it is still a candidate; bad files
and unwritable directories never break a kernel call. Runs on CPU: the timing (do_bench) is faked."""

import json
import logging
import os

import pytest
import torch

pytest.importorskip("triton")

from specq.kernels import triton_common as tc  # noqa: E402

A = tc.Config.make(num_warps=4, num_stages=3, BLOCK_N=64, SWAP=True)
B = tc.Config.make(num_warps=8, num_stages=4, BLOCK_N=128, SWAP=False)
KEY = (128, 0, 256, 4096, 4096, torch.bfloat16, False, 0)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = tc.DiskCache(str(tmp_path / "gpu-triton.json"))
    monkeypatch.setattr(tc, "DISK", d)
    monkeypatch.setattr(tc, "INTERPRET", False)
    monkeypatch.setattr(tc, "AUTOTUNE", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return d


def _fake_timing(monkeypatch, times: dict, calls: list):
    import triton.testing

    def do_bench(fn, **kwargs):
        fn()
        return times[calls[-1]]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)


def test_a_tuned_winner_is_stored_and_reused_by_a_new_process_without_timing(disk, monkeypatch):
    calls = []
    _fake_timing(monkeypatch, {A: 2.0, B: 1.0}, calls)
    assert tc.ConfigCache("w4a4_matmul").pick(KEY, [A, B], calls.append) == B
    assert calls == [A, B]
    stored = json.load(open(disk.path()))
    assert stored["w4a4_matmul"][str(KEY)] == {"meta": dict(B.meta), "num_warps": 8, "num_stages": 4}

    fresh = tc.DiskCache(disk.path())  # what the next process sees
    monkeypatch.setattr(tc, "DISK", fresh)

    def no_timing(*a, **k):
        raise AssertionError("a stored winner must not be timed again")
    monkeypatch.setattr("triton.testing.do_bench", no_timing)
    assert tc.ConfigCache("w4a4_matmul").pick(KEY, [A, B], lambda cfg: None) == B
    # another kernel's cache, or another key, has no entry: it tunes
    assert fresh.lookup("wq_matmul", KEY, [A, B]) is None
    assert fresh.lookup("w4a4_matmul", KEY[:2] + (1024,) + KEY[3:], [A, B]) is None


def test_a_stored_config_that_is_no_longer_a_candidate_is_ignored(disk):
    disk.store("w4a4_matmul", KEY, B)
    assert disk.lookup("w4a4_matmul", KEY, [A, B]) == B
    assert tc.DiskCache(disk.path()).lookup("w4a4_matmul", KEY, [A]) is None


def test_writes_merge_with_other_processes_entries(disk):
    other = tc.DiskCache(disk.path())
    other.store("wq_matmul", KEY, A)
    disk.store("w4a4_matmul", KEY, B)
    data = json.load(open(disk.path()))
    assert set(data) == {"wq_matmul", "w4a4_matmul"}
    assert not [f for f in os.listdir(os.path.dirname(disk.path())) if f.endswith(".tmp")]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"w4a4_matmul": {"KEY": 3}}'])
def test_a_damaged_file_is_ignored_and_rewritten(disk, content):
    with open(disk.path(), "w") as f:
        f.write(content.replace("KEY", str(KEY)))
    assert disk.lookup("w4a4_matmul", KEY, [A, B]) is None
    disk.store("w4a4_matmul", KEY, A)
    assert tc.DiskCache(disk.path()).lookup("w4a4_matmul", KEY, [A, B]) == A


def test_an_unwritable_cache_only_logs_and_turns_itself_off(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    d = tc.DiskCache(str(blocker / "sub" / "cache.json"))  # a directory under a regular file
    with caplog.at_level(logging.WARNING, logger="specq.kernels.triton_common"):
        d.store("w4a4_matmul", KEY, A)
    assert "SPECQ_AUTOTUNE_CACHE" in caplog.text
    assert d.path() is None and d.lookup("w4a4_matmul", KEY, [A]) is None


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPECQ_AUTOTUNE_CACHE", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    d = tc.DiskCache()
    assert d.path() is None
    d.store("w4a4_matmul", KEY, A)  # a no-op
