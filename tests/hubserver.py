"""A local, in-memory, Hugging Face Hub compatible HTTP server for tests (127.0.0.1 only).

It speaks the subset of the Hub protocol that the real ``huggingface_hub`` client uses to create a repo,
commit files (regular files inline, large/binary files through the Git LFS batch API with basic or
multipart transfers) and read them back (repo info, tree listing, paths info, ``resolve`` downloads
with ``HEAD``, ranges and the Hub's ``X-Repo-Commit``/``X-Linked-Etag`` headers). The Xet storage
protocol is not implemented: clients must run with ``HF_HUB_DISABLE_XET=1``, the documented fallback
to the LFS protocol (the :func:`local_hub` fixture arranges it).

Behaviour follows the Hub where the client depends on it: ``X-Error-Code`` headers (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) so the client raises its typed errors, 409 on an existing repo,
``.gitattributes`` rules deciding what goes to LFS, commits addressed by branch or 40-hex oid,
``parentCommit`` checks, ``create_pr`` opening ``refs/pr/N``, README metadata validation
(``/api/validate-yaml``) and card data in the repo info. Writes need a token from ``tokens``.

Use the fixture::

    from tests.hubserver import local_hub  # noqa: F401  (pytest fixture)

    def test_push(local_hub):
        HfApi(endpoint=local_hub.url, token=local_hub.token).create_repo("me/model")
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
        "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
        "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # the Hub sends larger files to LFS whatever the attributes say
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_OID = re.compile(r"^[0-9a-f]{40}$")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, len(self.data))

    @property
    def oid(self) -> str:  # git blob id: of the pointer file for LFS files
        return git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    next_pr: int = 1

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if _OID.match(revision):
            return self.commits.get(revision)
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubState:
    """Repos, LFS objects and a request log, shared by the handler threads."""

    def __init__(self, tokens: set[str], multipart_threshold: int, multipart_chunk: int) -> None:
        self.tokens = tokens
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, after a verified upload
        self.parts: dict[tuple[str, int], bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ repos and commits
    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id!r} not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, "You already created this repo", body={"url": None})
        repo = Repo(repo_type, repo_id, private)
        first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), False)})
        repo.refs["main"] = first.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, description: str, files: dict[str, Blob]) -> Commit:
        tree = "\n".join(f"{path} {blob.oid}" for path, blob in sorted(files.items()))
        body = f"tree {hashlib.sha1(tree.encode()).hexdigest()}\nparent {parent.oid if parent else ''}\n{_now()}\n{title}\n{description}"
        commit = Commit(hashlib.sha1(body.encode()).hexdigest(), parent.oid if parent else None, title, description, _now(), files)
        repo.commits[commit.oid] = commit
        return commit

    def is_lfs_path(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        attributes = commit.files.get(".gitattributes")
        patterns = []
        for line in (attributes.data.decode() if attributes else "").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        name = path.rsplit("/", 1)[-1]
        matched = any(fnmatch.fnmatch(path if "/" in p else name, p) for p in patterns)
        return matched or size >= REGULAR_MAX_BYTES or b"\0" in sample

    def commit(self, repo: Repo, revision: str, lines: list[dict], create_pr: bool) -> tuple[Commit, int | None]:
        base = repo.resolve(revision)
        if base is None:
            raise HubError(404, f"Revision {unquote(revision)!r} not found", "RevisionNotFound")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent):
            raise HubError(412, f"Parent commit {parent} is not the head of {unquote(revision)} ({base.oid})")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.lfs.get(value.get("oid", ""))
                if data is None:
                    raise HubError(400, f"LFS object {value.get('oid')} of {path} was never uploaded")
                if "size" in value and value["size"] != len(data):
                    raise HubError(400, f"LFS object of {path} has size {len(data)}, commit says {value['size']}")
                files[path] = Blob(data, True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        new = self._new_commit(repo, base, header.get("summary", ""), header.get("description", ""), files)
        if create_pr:
            number = repo.next_pr
            repo.next_pr += 1
            repo.refs[f"refs/pr/{number}"] = new.oid
            return new, number
        ref = unquote(revision)
        if ref in repo.refs:
            repo.refs[ref] = new.oid
        else:
            raise HubError(400, f"Cannot commit on top of a detached revision {ref!r}; use a branch")
        return new, None


def _front_matter(text: str) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    if data is not None and not isinstance(data, dict):
        raise ValueError("The metadata block of README.md must be a YAML mapping")
    return data or {}


_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def validate_card_metadata(text: str) -> list[str]:
    """The errors the Hub would report for a README.md's metadata (the parts the Hub checks strictly)."""
    try:
        meta = _front_matter(text)
    except (yaml.YAMLError, ValueError) as exc:
        return [f"Invalid YAML in README.md metadata: {exc}"]
    if meta is None:
        return []
    errors = []
    if "base_model_relation" in meta and meta["base_model_relation"] not in _RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(_RELATIONS)}')
    if "base_model_relation" in meta and not meta.get("base_model"):
        errors.append('"base_model_relation" needs "base_model"')
    for key in ("tags", "datasets", "language"):
        if key in meta and not isinstance(meta[key], (list, str)):
            errors.append(f'"{key}" must be a string or a list of strings')
    index = meta.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            return errors + ['"model-index" must be an array']
        for i, entry in enumerate(index):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                errors.append(f'"model-index[{i}].name" is required')
                continue
            for j, result in enumerate(entry.get("results") or []):
                where = f"model-index[{i}].results[{j}]"
                if not isinstance(result.get("task", {}).get("type"), str):
                    errors.append(f'"{where}.task.type" is required')
                dataset = result.get("dataset", {})
                if not isinstance(dataset.get("type"), str) or not isinstance(dataset.get("name"), str):
                    errors.append(f'"{where}.dataset" needs "type" and "name"')
                metrics = result.get("metrics")
                if not isinstance(metrics, list) or not metrics:
                    errors.append(f'"{where}.metrics" must be a non-empty array')
                    continue
                for k, metric in enumerate(metrics):
                    if not isinstance(metric.get("type"), str) or "value" not in metric:
                        errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalHub"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _require_write(self) -> None:
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated to write to the Hub (pass a token)")
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header", body={"error": "Invalid token"})

    def _readable(self, repo: Repo) -> Repo:
        if repo.private and self._token() not in self.state.tokens:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.state.log.append((method, url.path))
        try:
            with self.state.lock:
                for verb, pattern, handler in _ROUTES:
                    match = pattern.match(url.path)
                    if match and (verb == method or (verb == "GET" and method == "HEAD")):
                        return handler(self, **match.groupdict())
            raise HubError(404, f"No route for {method} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = {"error": err.message, **(err.body or {})}
            self._json(body, err.status, headers)
        except Exception as exc:  # a server bug must surface as a 500, not a dropped connection
            self._json({"error": f"{type(exc).__name__}: {exc}"}, 500, {"X-Error-Message": str(exc)})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ helpers on repos
    def _repo(self, kind: str, repo: str) -> Repo:
        return self._readable(self.state.repo(REPO_TYPES[kind], repo))

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _entry(self, path: str, blob: Blob) -> dict:
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        return entry

    def _folder(self, path: str, files: dict[str, Blob]) -> dict:
        inside = sorted((p, b.oid) for p, b in files.items() if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": path}

    # ------------------------------------------------------------------ endpoints
    def create_repo(self) -> None:
        self._require_write()
        payload = json.loads(self._body() or b"{}")
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "A repo name is required")
        repo_id = f"{organization or 'tester'}/{name}"
        repo_type = payload.get("type") or "model"
        url = f"{self.server.url}/{_PREFIX[repo_type]}{repo_id}"
        try:
            self.state.create_repo(repo_type, repo_id, payload.get("private") or payload.get("visibility") == "private")
        except HubError as err:
            err.body = {"url": url}
            raise
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def whoami(self) -> None:
        if self._token() not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({"type": "user", "name": "tester", "auth": {"accessToken": {"displayName": "test", "role": "write"}}})

    def validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        errors = validate_card_metadata(payload.get("content", ""))
        if errors:
            self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        else:
            self._json({"warnings": []})

    def repo_info(self, kind: str, repo: str, revision: str = "main") -> None:
        r = self._repo(kind, repo)
        commit = self._commit_at(r, revision)
        blobs = self.query.get("blobs") in ("True", "true", "1")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        readme = commit.files.get("README.md")
        try:
            card = _front_matter(readme.data.decode()) if readme else None
        except (yaml.YAMLError, ValueError):
            card = None
        info = {
            "_id": hashlib.sha1(r.repo_id.encode()).hexdigest()[:24], "id": r.repo_id, "modelId": r.repo_id,
            "author": r.repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date, "createdAt": r.created,
            "private": r.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": list((card or {}).get("tags") or []), "siblings": siblings,
        }  # fmt: skip
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
            if "model-index" in card:
                info["model-index"] = card["model-index"]
        config = commit.files.get("config.json")
        if config is not None:
            try:
                info["config"] = json.loads(config.data)
            except ValueError:
                pass
        self._json(info)

    def tree(self, kind: str, repo: str, revision: str, path: str | None = None) -> None:
        r = self._repo(kind, repo)
        commit = self._commit_at(r, revision)
        path = unquote(path or "").strip("/")
        recursive = self.query.get("recursive") in ("True", "true", "1")
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise HubError(400, f"{path} is a file, not a folder")
        entries, folders = [], set()
        for p, blob in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append(self._entry(p, blob))
        if path and not entries and not folders:
            raise HubError(404, f"{path} does not exist at {unquote(revision)}", "EntryNotFound")
        self._json([self._folder(f, commit.files) for f in sorted(folders)] + entries)

    def paths_info(self, kind: str, repo: str, revision: str) -> None:
        r = self._repo(kind, repo)
        commit = self._commit_at(r, revision)
        raw = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or "{}").get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._folder(path, commit.files))
        self._json(out)

    def preupload(self, kind: str, repo: str, revision: str) -> None:
        self._require_write()
        r = self._repo(kind, repo)
        commit = self._commit_at(r, revision)
        files = []
        for f in json.loads(self._body()).get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.state.is_lfs_path(commit, f["path"], int(f.get("size", 0)), sample)
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else git_blob_oid(existing.data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": commit.oid})

    def commit(self, kind: str, repo: str, revision: str) -> None:
        self._require_write()
        r = self._repo(kind, repo)
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        create_pr = self.query.get("create_pr") in ("1", "true", "True")
        new, pr = self.state.commit(r, revision, lines, create_pr)
        base = f"{self.server.url}/{_PREFIX[r.repo_type]}{r.repo_id}"
        self._json({
            "success": True, "commitOid": new.oid, "commitUrl": f"{base}/commit/{new.oid}",
            "pullRequestUrl": f"{base}/discussions/{pr}" if pr else None, "hookOutput": "",
        })  # fmt: skip

    def create_branch(self, kind: str, repo: str, branch: str) -> None:
        self._require_write()
        r = self._repo(kind, repo)
        name = unquote(branch)
        if name in r.refs:
            raise HubError(409, f"Branch {name!r} already exists")
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        r.refs[name] = self._commit_at(r, start).oid
        self._json({})

    def lfs_batch(self, prefix: str, repo: str) -> None:
        self._require_write()
        self.state.repo(REPO_TYPES.get(prefix.strip("/"), "model") if prefix else "model", repo)
        payload = json.loads(self._body())
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs:
                base = f"{self.server.url}/__lfs__/{oid}"
                if size > self.state.multipart_threshold:
                    chunk = self.state.multipart_chunk
                    parts = {str(i + 1): f"{base}/part/{i + 1}" for i in range(-(-size // chunk))}
                    upload = {"href": f"{base}/complete?size={size}", "header": {"chunk_size": str(chunk), **parts}}
                else:
                    upload = {"href": f"{base}/upload?size={size}"}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json")

    def _store_lfs(self, oid: str, data: bytes) -> None:
        size = self.query.get("size")
        if size is not None and int(size) != len(data):
            raise HubError(400, f"LFS object {oid}: got {len(data)} bytes, announced {size}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid}: content does not match its sha256")
        self.state.lfs[oid] = data

    def lfs_upload(self, oid: str) -> None:
        self._store_lfs(oid, self._body())
        self._send(200, b"", content_type="text/plain")

    def lfs_part(self, oid: str, number: str) -> None:
        data = self._body()
        self.state.parts[(oid, int(number))] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, content_type="text/plain")

    def lfs_complete(self, oid: str) -> None:
        payload = json.loads(self._body())
        chunks = []
        for part in payload.get("parts", []):
            data = self.state.parts.pop((oid, int(part["partNumber"])), None)
            if data is None or f'"{hashlib.md5(data).hexdigest()}"' != part["etag"]:
                raise HubError(400, f"LFS object {oid}: part {part['partNumber']} missing or with a wrong etag")
            chunks.append(data)
        self._store_lfs(oid, b"".join(chunks))
        self._json({"success": True})

    def lfs_verify(self, oid: str) -> None:
        payload = json.loads(self._body())
        data = self.state.lfs.get(oid)
        if data is None or payload.get("oid") != oid or int(payload.get("size", -1)) != len(data):
            raise HubError(404, f"LFS object {oid} was not uploaded (or has another size)")
        self._json({"success": True})

    def resolve(self, prefix: str, repo: str, revision: str, path: str) -> None:
        r = self._readable(self.state.repo(REPO_TYPES.get(prefix.strip("/"), "model") if prefix else "model", repo))
        commit = self._commit_at(r, revision)
        path = unquote(path)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry {path} not found at {unquote(revision)}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data)})
        data, status = blob.data, 200
        ranged = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, content_type="text/plain")
                return
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


_KIND = r"(?P<kind>models|datasets|spaces)"
_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", rf"/api/{_KIND}/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.repo_info),
    ("GET", rf"/api/{_KIND}/{_REPO}", _Handler.repo_info),
    ("GET", rf"/api/{_KIND}/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/{_KIND}/{_REPO}/paths-info/(?P<revision>[^/]+)", _Handler.paths_info),
    ("POST", rf"/api/{_KIND}/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/{_KIND}/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/{_KIND}/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/(?P<prefix>(?:datasets/|spaces/)?){_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})/upload", _Handler.lfs_upload),
    ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})/part/(?P<number>\d+)", _Handler.lfs_part),
    ("POST", r"/__lfs__/(?P<oid>[0-9a-f]{64})/complete", _Handler.lfs_complete),
    ("POST", r"/__lfs__/(?P<oid>[0-9a-f]{64})/verify", _Handler.lfs_verify),
    ("GET", rf"/(?P<prefix>(?:datasets/|spaces/)?){_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
_ROUTES = [(verb, re.compile(f"^{pattern}$"), handler) for verb, pattern, handler in _ROUTES]


class LocalHub(ThreadingHTTPServer):
    """The server; ``url`` is its endpoint, ``token`` a valid write token, ``state`` its content."""

    daemon_threads = True

    def __init__(self, token: str = "hf_local_test_token", multipart_threshold: int = 1 << 20, multipart_chunk: int = 256 << 10) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.state = HubState({token}, multipart_threshold, multipart_chunk)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)

    def start(self) -> "LocalHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Blob]:
        """The files of a repo at a revision (for assertions)."""
        commit = self.state.repo(repo_type, repo_id).resolve(quote(revision, safe=""))
        if commit is None:
            raise KeyError(revision)
        return dict(commit.files)

    def requests(self, method: str | None = None) -> list[str]:
        return [path for m, path in self.state.log if method is None or m == method]

    def client_env(self, cache_dir: str | None = None) -> dict[str, str]:
        """Environment variables that point a ``huggingface_hub`` client in a subprocess at this server."""
        env = {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        if cache_dir is not None:
            env["HF_HUB_CACHE"] = cache_dir
        return env


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """Start a :class:`LocalHub` on 127.0.0.1 and point the in-process ``huggingface_hub`` client at it."""
    from huggingface_hub import constants

    hub = LocalHub(multipart_threshold=128 << 10, multipart_chunk=64 << 10).start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    try:  # transformers keeps one HfApi (and its endpoint) per process
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    except ImportError:
        pass
    try:
        yield hub
    finally:
        hub.stop()
