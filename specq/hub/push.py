"""Push a checkpoint folder to the Hugging Face Hub, and pull one back (only the shards of the modes asked for).

Push: create the repo (exist_ok), then ONE `create_commit` with every file of the folder. The client
first uploads large files to LFS/Xet storage and only then writes the commit, so an interrupted push
leaves no half-written commit; re-running it resumes, because storage answers "already have it" for
the objects that made it (LFS batch returns no upload action; Xet deduplicates chunks) and
unchanged files are dropped from the commit (the preupload call returns their remote oid).
We call `create_commit` rather than `upload_folder`: with Xet installed, `upload_folder` may split a
large folder into several commits, and a checkpoint must appear atomically.

Pull: fetch config.json and the shard index at the asked revision, resolve that revision to a commit
sha once (so every later file comes from the same commit), then `snapshot_download` everything except
the shards of modes that were not asked for.

Tokens: passed through to huggingface_hub only; never printed, logged or written by specq.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from specq.hub.errors import CheckpointError, HubAccessError
from specq.hub.layout import INDEX_FILE, shard_files_to_skip

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


@dataclass
class PushResult:
    repo_id: str
    commit_sha: str
    commit_url: str
    files: int


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                progress: bool = True) -> PushResult:
    """Create `repo_id` (if needed) and upload `folder` to it in one commit; returns the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / INDEX_FILE).is_file():
        raise CheckpointError(f"{folder} is not a specq checkpoint folder (no {CONFIG_FILE} or {INDEX_FILE}); "
                              "write one with `specq convert --out DIR` first.")
    api = HfApi(endpoint=endpoint, token=token)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(folder)))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in paths]
    try:
        with _progress_bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id, operations=operations, revision=revision,
                                     commit_message=commit_message or "Upload specq multi-mode checkpoint")
    except Exception as e:  # noqa: BLE001 -- translated into one clear message below
        raise _hub_error(e, repo_id, api.endpoint, writing=True) from e
    return PushResult(repo_id=repo_id, commit_sha=info.oid, commit_url=info.commit_url, files=len(operations))


def pull(repo_id: str, *, modes=None, revision: str | None = None, token: str | None = None,
         endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
         local_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download a specq checkpoint from the Hub; with `modes`, only the shards those modes need.

    Returns the local folder (a snapshot in the HF cache, or `local_dir`).
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _progress_bars(progress):
            sha = api.repo_info(repo_id, revision=revision, repo_type="model").sha
            common = dict(repo_id=repo_id, revision=sha, token=token, endpoint=endpoint, cache_dir=cache_dir,
                          local_dir=local_dir)
            config = json.loads(Path(hf_hub_download(filename=CONFIG_FILE, **common)).read_text())
            index = json.loads(Path(hf_hub_download(filename=INDEX_FILE, **common)).read_text())
            skip = shard_files_to_skip(config, index, modes)  # raises CheckpointError on unknown modes
            path = snapshot_download(ignore_patterns=skip or None, **common)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, api.endpoint, writing=False, revision=revision) from e
    return Path(path)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """huggingface_hub's tqdm bars (stderr) on or off for one call, restoring the caller's setting."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _hub_error(e: BaseException, repo_id: str, endpoint: str, *, writing: bool,
               revision: str | None = None) -> HubAccessError:
    """One message per failure kind, naming the fix. The token never appears in it."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RevisionNotFoundError):
        return HubAccessError(f"Revision {revision!r} does not exist in {repo_id!r}; pass a branch, tag or commit "
                              "sha that exists (or omit --revision for the latest).")
    if isinstance(e, EntryNotFoundError):
        return HubAccessError(f"{repo_id!r} at {revision or 'main'} is not a specq checkpoint "
                              f"(missing file): {_first_line(e)}")
    if isinstance(e, RepositoryNotFoundError) and not writing:
        return HubAccessError(f"Repository {repo_id!r} was not found on {endpoint} (or it is private and no valid "
                              "token was given). Check the id, log in with `hf auth login`, or pass a local path.")
    if status in (401, 403) or (writing and isinstance(e, RepositoryNotFoundError)):
        return HubAccessError(f"Permission denied writing to {repo_id!r} on {endpoint}: the token is missing or may "
                              "not write to this namespace. Use a token with write access (`hf auth login`) or "
                              "push to a repo under your own namespace.")
    if isinstance(e, LocalEntryNotFoundError) or _is_connection_error(e):
        return HubAccessError(f"Cannot reach the Hugging Face Hub at {endpoint} (no network?). "
                              f"{'Retry later.' if writing else 'Pass a local checkpoint directory instead.'}")
    if isinstance(e, HfHubHTTPError):
        return HubAccessError(f"The Hub refused the request for {repo_id!r} (HTTP {status}): {_first_line(e)}")
    if writing:
        return HubAccessError(f"Upload to {repo_id!r} failed: {_first_line(e)} Re-run the same command to resume: "
                              "files already uploaded are not sent again, and nothing was committed.")
    return HubAccessError(f"Download of {repo_id!r} failed: {type(e).__name__}: {_first_line(e)} "
                          "Re-run to resume; completed files are kept in the cache.")


def _is_connection_error(e: BaseException) -> bool:
    import httpx

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
