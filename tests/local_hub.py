"""A small in-process stand-in for the Hugging Face Hub, on 127.0.0.1, for tests.

It speaks the subset of the Hub HTTP API that the real `huggingface_hub` client (1.x) uses to
create a repo, commit a folder (regular files inline in the NDJSON commit, large files through the
git-LFS batch API with "basic" transfers), resolve revisions and download files:

    POST /api/repos/create                               create_repo
    POST /api/validate-yaml                              README.md metadata check in create_commit
    GET  /api/models/{ns}/{name}[/revision/{rev}]        repo_info / model_info (sha, siblings)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]     list_repo_tree (snapshot_download)
    POST /api/models/{ns}/{name}/preupload/{rev}         upload modes ("regular" | "lfs") + remote oids
    POST /{ns}/{name}.git/info/lfs/objects/batch         LFS batch: upload actions only for missing objects
    PUT  /_lfs/{oid}      POST /_lfs/{oid}/verify        LFS object storage (sha256 checked)
    POST /api/models/{ns}/{name}/commit/{rev}            NDJSON commit (header, file, lfsFile, deleted*)
    POST /api/models/{ns}/{name}/tag/{rev}               create_tag
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}           download (X-Repo-Commit, ETag, Range)

Xet storage is not implemented: tests set `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`
(see `hub_client_env`), which makes the client fall back to the LFS protocol above.

Permissions: `tokens` maps a token to the set of namespaces it may write. Reads of public repos need
no token; private repos answer 404 (as the Hub does) to requests without a token for the namespace.
Writes without permission answer 403. Faults for tests: `fail_lfs_puts_after = n` makes every LFS
PUT after the n-th successful one fail (an interrupted upload).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024  # bytes; files at least this large go through LFS (the Hub uses 10 MB / binary sniffing)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    oid: str  # git blob sha1 (regular) -- what the tree endpoint calls "oid"
    content: bytes | None = None  # regular files are stored inline
    lfs_sha256: str | None = None  # LFS files point into the object store


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class LocalHub:
    """Start with `with LocalHub(tokens={"tok": {"me"}}) as hub:`; `hub.endpoint` is the base URL."""

    def __init__(self, tokens: dict[str, set[str]] | None = None, lfs_threshold: int = LFS_THRESHOLD):
        self.tokens = {k: set(v) for k, v in (tokens or {}).items()}
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_puts: list[str] = []  # oids stored through PUT, in order
        self.downloads: list[str] = []  # "repo_id:path" of every GET on resolve
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.auth_headers_seen: set[str] = set()
        self.fail_lfs_puts_after: int | None = None
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- state helpers --------------------------------------------------------------------------
    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        commit = repo.commits[self._resolve(repo, revision)]
        return {p: self._read(e) for p, e in commit.files.items()}

    def _read(self, entry: Entry) -> bytes:
        return entry.content if entry.content is not None else self.lfs_objects[entry.lfs_sha256]

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_sha(self, *parts: str) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        return hashlib.sha1("\0".join((*parts, str(counter), str(time.time()))).encode()).hexdigest()

    def _can_write(self, token: str | None, namespace: str) -> bool:
        return token is not None and namespace in self.tokens.get(token, set())

    def _get_repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(token, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self._get_repo(repo_id, token)
        if token is not None and token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        if not self._can_write(token, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        sha = self._new_sha(repo_id, "initial commit")
        repo.commits[sha] = Commit(sha=sha, parent=None, message="initial commit", files={})
        repo.refs["main"] = sha
        self.repos[repo_id] = repo
        return repo


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/tag/(?P<rev>[^/]+)$"), "tag"),
    ("POST", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})/verify$"), "lfs_verify"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth:
            self.hub.auth_headers_seen.add(auth)
        if auth and auth.lower().startswith("bearer "):
            return auth.split(" ", 1)[1].strip()
        return None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self):
        url = urlsplit(self.path)
        path = url.path
        self.hub.requests.append((self.command, path))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        for method, pattern, name in _ROUTES:
            m = pattern.match(path)
            if method == self.command and m:
                groups = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                try:
                    getattr(self, "do_" + name)(query=query, **groups)
                except HubError as e:
                    headers = {"X-Error-Message": e.message}
                    if e.code:
                        headers["X-Error-Code"] = e.code
                    self._json({"error": e.message, **e.extra}, e.status, headers)
                return
        self._json({"error": f"no route for {self.command} {path}"}, 404)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch  # noqa: E731

    # -- endpoints ------------------------------------------------------------------------------
    def do_create(self, query):
        hub, token = self.hub, self._token()
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "only model repos are supported by the local hub")
        namespace = payload.get("organization")
        if namespace is None:  # the Hub uses the token's user; here, its only (or first) namespace
            namespace = sorted(hub.tokens.get(token, {"anonymous"}))[0]
        repo_id = f"{namespace}/{payload['name']}"
        if token is None or token not in hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        if not hub._can_write(token, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in hub.repos:
            raise HubError(409, "You already created this model repo", extra={"url": f"{hub.endpoint}/{repo_id}"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub.create_repo(repo_id, private=private)
        self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def do_validate_yaml(self, query):
        self._body()
        self._json({"errors": [], "warnings": []})

    def do_info(self, query, repo, rev=None):
        hub = self.hub
        r = hub._get_repo(repo, self._token())
        sha = hub._resolve(r, rev or "main")
        files = r.commits[sha].files
        self._json({
            "id": repo, "modelId": repo, "sha": sha, "private": r.private,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def do_tree(self, query, repo, rev, path=None):
        hub = self.hub
        r = hub._get_repo(repo, self._token())
        files = r.commits[hub._resolve(r, rev)].files
        prefix = (path.rstrip("/") + "/") if path else ""
        recursive = str(query.get("recursive", "false")).lower() == "true"
        out, folders = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:  # intermediate folders are listed too, as on the Hub
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    folders.add(prefix + "/".join(parts[: i + 1]))
            e = files[p]
            item = {"type": "file", "path": p, "size": e.size, "oid": e.oid}
            if e.lfs_sha256 is not None:
                item["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": 134}
            out.append(item)
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)]
        self._json(out)

    def do_preupload(self, query, repo, rev):
        hub, token = self.hub, self._token()
        payload = json.loads(self._body())
        r = hub._writable_repo(repo, token)
        files = r.commits[hub._resolve(r, rev)].files
        out = []
        for f in payload["files"]:
            mode = "lfs" if f["size"] >= hub.lfs_threshold else "regular"
            existing = files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if mode == "lfs" and existing.lfs_sha256 else existing.oid
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": out})

    def do_lfs_batch(self, query, repo):
        hub, token = self.hub, self._token()
        payload = json.loads(self._body())
        repo = repo.removesuffix(".git")
        hub._writable_repo(repo, token)
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs_objects:  # already stored objects get no actions: the client skips them
                href = f"{hub.endpoint}/_lfs/{obj['oid']}"
                item["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def do_lfs_put(self, query, oid):
        hub = self.hub
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "LFS object does not match its oid")
        with hub._lock:  # check and store atomically: parallel PUTs must not both slip under the limit
            if hub.fail_lfs_puts_after is not None and len(hub.lfs_puts) >= hub.fail_lfs_puts_after:
                raise HubError(400, "simulated interruption of the LFS upload")
            hub.lfs_objects[oid] = data
            hub.lfs_puts.append(oid)
        self._send(200)

    def do_lfs_verify(self, query, oid):
        body = json.loads(self._body() or b"{}")
        if oid not in self.hub.lfs_objects or len(self.hub.lfs_objects[oid]) != body.get("size"):
            raise HubError(404, "LFS object not found")
        self._json({})

    def do_commit(self, query, repo, rev):
        hub, token = self.hub, self._token()
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        r = hub._writable_repo(repo, token)
        parent_sha = hub._resolve(r, rev)
        files = dict(r.commits[parent_sha].files)
        header = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                if value.get("parentCommit") and value["parentCommit"] != parent_sha:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Entry(size=len(data), oid=git_blob_sha1(data), content=data)
            elif key == "lfsFile":
                data = hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {len(data)}\n"
                files[value["path"]] = Entry(size=len(data), oid=git_blob_sha1(pointer.encode()),
                                             lfs_sha256=value["oid"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        sha = hub._new_sha(repo, parent_sha, header.get("summary", ""))
        r.commits[sha] = Commit(sha=sha, parent=parent_sha, message=header.get("summary", ""), files=files)
        r.refs[rev if rev in r.refs else "main"] = sha
        self._json({"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None, "success": True})

    def do_tag(self, query, repo, rev):
        hub, token = self.hub, self._token()
        payload = json.loads(self._body())
        r = hub._writable_repo(repo, token)
        if payload["tag"] in r.refs:
            raise HubError(409, f"Tag {payload['tag']} already exists")
        r.refs[payload["tag"]] = hub._resolve(r, rev)
        self._json({})

    def do_resolve(self, query, repo, rev, path):
        hub = self.hub
        r = hub._get_repo(repo, self._token())
        sha = hub._resolve(r, rev)
        entry = r.commits[sha].files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = entry.lfs_sha256 or entry.oid
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(entry.size)
        data = hub._read(entry)
        status = 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        if self.command == "GET":
            hub.downloads.append(f"{repo}:{path}")
        self._send(status, data, headers, content_type="application/octet-stream")


@contextlib.contextmanager
def hub_client_env(hub: LocalHub, cache_dir):
    """Point the in-process huggingface_hub client at `hub`, LFS instead of Xet, cache in `cache_dir`."""
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in ("HF_HUB_DISABLE_XET", "ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE",
                                                 "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    try:
        constants.HF_HUB_DISABLE_XET = True
        constants.ENDPOINT = hub.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_CACHE = str(cache_dir)
        constants.HF_HUB_OFFLINE = False
        yield hub
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)
