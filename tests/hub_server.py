"""A small in-memory Hugging Face Hub for tests.

No package on the registry serves the Hub's write API, so this stdlib server speaks the endpoints that
huggingface_hub 2.4 uses to create repositories, commit files, list trees and download files. Every file is committed as a regular git blob (preupload answers "regular"), so no LFS or Xet
traffic happens. Repositories live in memory; commits get sha1 ids like git's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}


def git_blob_sha1(content: bytes) -> str:
    """The oid git (and the Hub) gives a regular file: sha1 of a 'blob <size>' header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.extra, self.headers = extra or {}, headers or {}


class Repo:
    """Commits as whole-tree snapshots {path: bytes}; refs map branch names to commit shas."""

    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")

    def resolve(self, revision: str) -> str:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}\0{parent}\0{len(self.commits)}\0{message}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha


class HubServer:
    """`with HubServer() as hub:` serves on 127.0.0.1 at `hub.url`; `hub.requests` logs (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise HubError(404, "Repository not found", "RepoNotFound") from None

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"


def configure_client(monkeypatch, endpoint: str, hf_home: Path, token: str | None = "hf_test_token") -> None:
    """Point huggingface_hub at `endpoint` with its cache and token store under `hf_home`.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`; set both the
    environment (for subprocesses) and the constants (for this process).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    hub_cache, token_path = str(hf_home / "hub"), str(hf_home / "token")
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    for key in ("HF_HUB_CACHE", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": token_path,
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    close_session()  # the shared HTTP client is rebuilt with the proxy settings above


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    # -- plumbing ------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        self.hub.requests.append((method, url.path))
        try:
            with self.hub.lock:
                status, payload, headers = self._route(method, segments, query, body)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            status, payload = e.status, {"error": e.message, **e.extra}
        self._send(method, status, payload, headers)

    def _send(self, method: str, status: int, payload, headers: dict) -> None:
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _authorized(self) -> bool:
        return self.headers.get("authorization", "").startswith("Bearer ")

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid username or password.")

    def _readable(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repo(repo_type, repo_id)
        if repo.private and not self._authorized():
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    # -- routes ----------------------------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str], query: dict, body: bytes):
        if method == "POST" and seg == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if method == "POST" and seg == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in _TYPES:
            repo_type, repo_id, rest = _TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo_type, repo_id, "/".join(rest[1:]) or "main")
            if method == "GET" and rest[0] == "tree":
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and rest[0] == "preupload":
                return self._preupload(repo_type, repo_id, rest[1], json.loads(body))
            if method == "POST" and rest[0] == "commit":
                return self._commit(repo_type, repo_id, rest[1], body)
            if method == "POST" and rest[0] == "branch":
                return self._branch(repo_type, repo_id, rest[1], json.loads(body or b"{}"))
        if method in ("GET", "HEAD"):
            repo_type, path = ("dataset", seg[1:]) if seg[0] == "datasets" else ("model", seg)
            if len(path) >= 5 and path[2] == "resolve":
                return self._resolve(repo_type, f"{path[0]}/{path[1]}", path[3], "/".join(path[4:]))
        raise HubError(404, f"no route for {method} {self.path}")

    def _create(self, payload: dict):
        self._require_auth()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        key = (repo_type, repo_id)
        if key in self.hub.repos:
            url = self.hub.repo_url(self.hub.repos[key])
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        self.hub.repos[key] = repo
        return 200, {"url": self.hub.repo_url(repo), "name": repo_id}, {}

    def _validate_yaml(self, payload: dict):
        content = payload["content"]
        if content.startswith("---\n"):
            front = content[4:].split("\n---", 1)[0]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as e:
                raise HubError(400, "Invalid metadata", extra={"errors": [{"message": str(e)}]}) from None
            if meta is not None and not isinstance(meta, dict):
                raise HubError(400, "Invalid metadata", extra={"errors": [{"message": "metadata is not a mapping"}]})
        return 200, {}, {}

    def _info(self, repo_type: str, repo_id: str, revision: str):
        repo = self._readable(repo_type, repo_id)
        sha = repo.resolve(revision)
        siblings = [{"rfilename": p, "size": len(c), "blobId": git_blob_sha1(c)}
                    for p, c in sorted(repo.commits[sha].items())]
        return 200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings}, {}

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str, query: dict):
        repo = self._readable(repo_type, repo_id)
        files = repo.commits[repo.resolve(revision)]
        recursive = query.get("recursive", "false").lower() == "true"
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                folder = base + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        return 200, list(entries.values()), {}

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict):
        self._require_auth()
        repo = self.hub.repo(repo_type, repo_id)
        files = repo.commits[repo.resolve(revision)]
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                  for f in payload["files"]]
        return 200, {"files": answer}, {}

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes):
        self._require_auth()
        repo = self.hub.repo(repo_type, repo_id)
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.refs[revision]])
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.refs[revision]):
            raise HubError(412, "A commit has happened since the parent commit")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (this test Hub stores regular files only)")
        sha = repo.commit(revision, files, header["summary"])
        return 200, {"commitUrl": f"{self.hub.repo_url(repo)}/commit/{sha}", "commitOid": sha, "success": True}, {}

    def _branch(self, repo_type: str, repo_id: str, branch: str, payload: dict):
        self._require_auth()
        repo = self.hub.repo(repo_type, repo_id)
        if branch in repo.refs:
            raise HubError(409, f"Reference {branch} already exists")
        repo.refs[branch] = repo.resolve(payload.get("startingPoint") or "main")
        return 200, {}, {}

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self._readable(repo_type, repo_id)
        sha = repo.resolve(revision)
        if path not in repo.commits[sha]:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        content = repo.commits[sha][path]
        return 200, content, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(content)}"'}
