"""Push and pull through the real huggingface_hub client against tests/local_hub.py.

The folders here are synthetic specq checkpoint folders (config + index + random shard bytes): these
tests are about transport (one commit, resume, partial download, pinning, errors), not tensors.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from local_hub import LocalHub, hub_client_env
from specq.hub.errors import CheckpointError, HubAccessError
from specq.hub.layout import FORMAT_VERSION, INDEX_FILE, file_sha256, shard_name
from specq.hub.push import pull, push_to_hub

TOKEN = "hf_test_write_token_0123456789"
OTHER_TOKEN = "hf_test_other_token_9876543210"


def write_fake_checkpoint(folder, seed=0, modes=("bf16", "mxfp4", "w4a16")):
    """A folder with the specq layout; each shard is 4 KiB of seeded random bytes (LFS-sized)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups = ["common"] + [g for g in ("bf16", "mxfp4", "int4")
                           if (g == "int4" and {"w4a16", "w4a4"} & set(modes)) or g in modes]
    files = {}
    for g in groups:
        name = shard_name(g, 1, 1)
        (folder / name).write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
        files[name] = {"group": g, "size": 4096, "sha256": file_sha256(folder / name)}
    index = {"metadata": {"format": "specq", "format_version": FORMAT_VERSION}, "files": files,
             "weight_map": {f"t.{g}": shard_name(g, 1, 1) for g in groups}}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "specq", "format_version": FORMAT_VERSION, "modes": list(modes)}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("---\nlibrary_name: specq\n---\n# test\n")
    return folder


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tokens={TOKEN: {"me"}, OTHER_TOKEN: {"other"}}) as h, hub_client_env(h, tmp_path / "hf-cache"):
        yield h


def test_push_creates_repo_and_uploads_folder_in_one_commit(hub, tmp_path):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    result = push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    assert hub.commit_count("me/model") == 2  # the repo's initial commit + exactly one upload commit
    stored = hub.files_at("me/model")
    assert set(stored) == {p.name for p in folder.iterdir()}
    for name, data in stored.items():
        assert data == (folder / name).read_bytes()
    assert len(hub.lfs_puts) == 4  # the four 4 KiB shards went through LFS, the small json files inline
    assert result.commit_sha == hub.repos["me/model"].refs["main"]


def test_pull_fetches_only_the_shards_of_the_requested_modes(hub, tmp_path):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    path = pull("me/model", modes=["mxfp4"], endpoint=hub.endpoint, cache_dir=tmp_path / "c1", progress=False)
    got = {p.name for p in path.iterdir()}
    assert shard_name("mxfp4", 1, 1) in got and shard_name("common", 1, 1) in got
    assert shard_name("bf16", 1, 1) not in got and shard_name("int4", 1, 1) not in got
    downloaded = {d.split(":", 1)[1] for d in hub.downloads}
    assert not any(n in downloaded for n in (shard_name("bf16", 1, 1), shard_name("int4", 1, 1)))
    assert (path / shard_name("mxfp4", 1, 1)).read_bytes() == (folder / shard_name("mxfp4", 1, 1)).read_bytes()
    full = pull("me/model", endpoint=hub.endpoint, cache_dir=tmp_path / "c2", progress=False)
    assert {p.name for p in full.iterdir()} == {p.name for p in folder.iterdir()}


def test_pull_with_revision_pinning(hub, tmp_path):
    v1 = write_fake_checkpoint(tmp_path / "v1", seed=1)
    v2 = write_fake_checkpoint(tmp_path / "v2", seed=2)
    first = push_to_hub(v1, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint, token=TOKEN).create_tag("me/model", tag="v1", revision=first.commit_sha)
    second = push_to_hub(v2, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    assert first.commit_sha != second.commit_sha
    shard = shard_name("mxfp4", 1, 1)
    for rev, src in ((first.commit_sha, v1), ("v1", v1), (None, v2), ("main", v2)):
        path = pull("me/model", revision=rev, endpoint=hub.endpoint, cache_dir=tmp_path / f"c-{rev}",
                    progress=False)
        assert (path / shard).read_bytes() == (src / shard).read_bytes(), rev
    with pytest.raises(HubAccessError, match="Revision 'nope' does not exist"):
        pull("me/model", revision="nope", endpoint=hub.endpoint, cache_dir=tmp_path / "c3", progress=False)


def test_interrupted_upload_resumes_without_resending(hub, tmp_path):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    hub.fail_lfs_puts_after = 1  # the connection "drops" after the first large file
    with pytest.raises(HubAccessError, match="Re-run the same command"):
        push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    assert hub.commit_count("me/model") == 1  # nothing half-committed: only the initial commit
    sent_first = list(hub.lfs_puts)
    assert len(sent_first) == 1
    hub.fail_lfs_puts_after = None
    push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    assert hub.commit_count("me/model") == 2
    assert len(hub.lfs_puts) == 4 and len(set(hub.lfs_puts)) == 4  # the first object was not sent again
    assert hub.files_at("me/model")[shard_name("int4", 1, 1)] == (folder / shard_name("int4", 1, 1)).read_bytes()


def test_push_without_permission_is_refused_clearly(hub, tmp_path):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    push_to_hub(folder, "other/model", token=OTHER_TOKEN, endpoint=hub.endpoint, progress=False)
    for repo in ("other/model", "other/new-model"):  # existing public repo (403) and a new one (403 on create)
        with pytest.raises(HubAccessError, match="Permission denied") as info:
            push_to_hub(folder, repo, token=TOKEN, endpoint=hub.endpoint, progress=False)
        assert TOKEN not in str(info.value)
    assert hub.commit_count("other/model") == 2 and "other/new-model" not in hub.repos


def test_private_repo_needs_a_token_to_pull(hub, tmp_path):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    push_to_hub(folder, "me/secret", private=True, token=TOKEN, endpoint=hub.endpoint, progress=False)
    assert hub.repos["me/secret"].private
    with pytest.raises(HubAccessError, match="not found"):
        pull("me/secret", endpoint=hub.endpoint, cache_dir=tmp_path / "c1", progress=False, token=False)
    path = pull("me/secret", token=TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "c2", progress=False)
    assert (path / "config.json").is_file()


def test_pull_errors_unknown_repo_unknown_mode_and_no_network(hub, tmp_path):
    with pytest.raises(HubAccessError, match="was not found.*pass a local path"):
        pull("me/missing", endpoint=hub.endpoint, cache_dir=tmp_path / "c", progress=False)
    folder = write_fake_checkpoint(tmp_path / "ckpt", modes=("bf16", "mxfp4"))
    push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=False)
    with pytest.raises(CheckpointError, match=r"does not hold mode\(s\) \['w4a4'\]"):
        pull("me/model", modes=["w4a4"], endpoint=hub.endpoint, cache_dir=tmp_path / "c", progress=False)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connection refused
    try:
        with pytest.raises(HubAccessError, match="Cannot reach the Hugging Face Hub.*local checkpoint directory"):
            pull("me/model", endpoint=dead, cache_dir=tmp_path / "c4", progress=False)
    finally:
        s.close()


def test_token_is_never_logged_or_written(hub, tmp_path, caplog, capfd):
    folder = write_fake_checkpoint(tmp_path / "ckpt")
    caplog.set_level(logging.DEBUG)
    push_to_hub(folder, "me/model", token=TOKEN, endpoint=hub.endpoint, progress=True)
    path = pull("me/model", token=TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", progress=True)
    assert f"Bearer {TOKEN}" in hub.auth_headers_seen  # it was used ...
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text  # ... but never printed or logged
    for root in (tmp_path / "cache", folder, path):
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        assert TOKEN.encode() not in f.read(), p


def test_from_pretrained_from_the_hub_downloads_only_the_requested_modes(hub, tmp_path):
    import torch

    import specq
    from tiny_models import make_tiny_model

    mm = specq.transform(make_tiny_model("qwen2", seed=5), modes=("bf16", "mxfp4", "w4a16", "w4a4"))
    specq.save_pretrained(mm, tmp_path / "ck")
    push_to_hub(tmp_path / "ck", "me/qwen-specq", token=TOKEN, endpoint=hub.endpoint, progress=False)
    hub.downloads.clear()
    loaded = specq.from_pretrained("me/qwen-specq", modes=["w4a4"], endpoint=hub.endpoint,
                                   cache_dir=tmp_path / "cache")
    shards = sorted(d.split(":")[1] for d in hub.downloads if d.endswith(".safetensors"))
    assert shards == ["model-common-00001-of-00001.safetensors", "model-int4-00001-of-00001.safetensors"]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad(), specq.mode(mm, "w4a4"):
        assert torch.equal(mm(ids).logits, loaded(ids).logits)
