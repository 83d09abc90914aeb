"""A minimal Hugging Face hub on 127.0.0.1 for the tests: the HTTP API huggingface_hub 2.4.0 downloads through.

    repos = {"owner/tiny": {"main": Path("weights/tiny/base"), "v1": Path(...)}}
    with HubServer(repos) as hub:                  # hub.url: http://127.0.0.1:<port>, for HF_ENDPOINT
        hub.sha("owner/tiny", "main")              # the deterministic fake commit of a revision
        hub.set_fault("owner/tiny", "model.safetensors", Fault(corrupt=True, times=1))
        ...
        assert hub.downloads("owner/tiny") == {"model.safetensors": 2, "config.json": 1, ...}

Each repository is built from local directories, one per revision or branch (a revision that is already a 40-hex
sha is its own commit; any other gets sha1("repo@revision")). The routes are those snapshot_download and
hf_hub_download use (see huggingface_hub's hf_api.py and file_download.py):

- `GET /api/models/{repo}[/revision/{rev}]`: repo info, with `sha` and `siblings`;
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..`: the file listing (`oid`, `size`, `lfs.oid`);
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: a file stored in git answers itself (`ETag` its git blob sha1,
  `X-Repo-Commit`, `Content-Length`, Range on GET); an LFS file (weights) answers `302` to a CDN on another
  origin, with `X-Linked-Etag` (its sha256) and `X-Linked-Size`, as the real hub does. huggingface_hub does not
  follow a HEAD redirect to another origin: it reads the metadata from the 302 and GETs the CDN URL itself.
- Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which huggingface_hub maps
  to its exception types.

No Xet headers are ever sent, so the client (hf-xet is installed) takes the plain HTTP path. The CDN is a
`tests.support.fileserver.FileServer` (Range support, byte-level faults: corrupt, drop, delay, status); faults on the
hub itself are per repository: `set_missing` (404) and `set_delay` (no answer for a while, for timeouts).
"""

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.fileserver import Fault, FileServer

__all__ = ["Fault", "HubServer", "LFS_SUFFIXES"]

COMMIT = re.compile(r"^[0-9a-f]{40}$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
# Stored in LFS, as the hub's default .gitattributes does; everything else is a plain git blob.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".model")
LFS_MIN_SIZE = 10 << 20


class _File:
    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.size = path, data, len(data)
        self.lfs = path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE
        self.sha256 = hashlib.sha256(data).hexdigest()
        stored = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
            if self.lfs
            else data
        )
        self.pointer_size = len(stored)
        self.oid = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()  # the git blob id


class _Revision:
    def __init__(self, sha: str, directory: Path):
        self.sha = sha
        self.files = {
            path.relative_to(directory).as_posix(): _File(path.relative_to(directory).as_posix(), path.read_bytes())
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }


class HubServer:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.cdn = FileServer()
        self.repos: dict[str, dict[str, _Revision]] = {}
        self.missing: set[str] = set()
        self.delays: dict[str, float] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) received by the hub itself
        self.authorizations: list[str] = []  # the Authorization headers the hub received
        self.served: Counter = Counter()  # (repo_id, filename) -> bodies of git-stored files the hub sent itself
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # clients that time out and go away
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        for repo_id, revisions in repos.items():
            self.add_repo(repo_id, revisions)

    def __enter__(self) -> "HubServer":
        self.cdn.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # wakes handlers sleeping in a delay
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self.cdn.__exit__(*exc)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- repositories ------------------------------------------------------------------------------------------

    @staticmethod
    def sha_of(repo_id: str, revision: str) -> str:
        return revision if COMMIT.match(revision) else hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def sha(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id][revision].sha

    def add_repo(self, repo_id: str, revisions: dict[str, Path]) -> None:
        built = {name: _Revision(self.sha_of(repo_id, name), Path(directory)) for name, directory in revisions.items()}
        with self._lock:
            self.repos[repo_id] = {**built, **{revision.sha: revision for revision in built.values()}}
        for revision in built.values():
            for file in revision.files.values():
                if file.lfs:
                    self.cdn.add(self.cdn_path(repo_id, file), file.data)

    @staticmethod
    def cdn_path(repo_id: str, file: _File) -> str:
        return f"/lfs/{repo_id}/{file.sha256}/{file.path}"

    def file(self, repo_id: str, filename: str, revision: str = "main") -> _File:
        return self.repos[repo_id][revision].files[filename]

    # -- faults ------------------------------------------------------------------------------------------------

    def set_fault(self, repo_id: str, filename: str, fault: Optional[Fault], revision: str = "main") -> None:
        """A fault on the bytes of an LFS file, served by the CDN (see tests.support.fileserver.Fault)."""
        file = self.file(repo_id, filename, revision)
        if not file.lfs:
            raise ValueError(f"{filename} is not an LFS file: the hub serves it itself, without byte faults")
        self.cdn.set_fault(self.cdn_path(repo_id, file), fault)

    def set_missing(self, repo_id: str, missing: bool = True) -> None:
        """Answer 404 RepoNotFound for this repository (as for a deleted or private one)."""
        with self._lock:
            (self.missing.add if missing else self.missing.discard)(repo_id)

    def set_delay(self, repo_id: str, seconds: float) -> None:
        """Wait `seconds` before answering any hub request about this repository (0: no delay)."""
        with self._lock:
            self.delays[repo_id] = seconds

    # -- counters ----------------------------------------------------------------------------------------------

    def file_requests(self, repo_id: Optional[str] = None) -> list[tuple[str, str]]:
        """(method, filename) of every request about a file: HEAD/GET on the hub, GET on the CDN."""
        found = []
        with self._lock:
            hub = list(self.requests)
        for method, path in hub:
            match = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
            if match and repo_id in (None, match[1]):
                found.append((method, match[2]))
        for method, path, _ in list(self.cdn.requests):
            match = re.match(r"^/lfs/([^/]+/[^/]+)/[0-9a-f]{64}/(.+)$", path)
            if match and repo_id in (None, match[1]):
                found.append((method, match[2]))
        return found

    def downloads(self, repo_id: Optional[str] = None) -> Counter:
        """filename -> GET requests that fetched its bytes (from the hub for git files, the CDN for LFS files)."""
        with self._lock:
            counts = Counter({name: n for (repo, name), n in self.served.items() if repo_id in (None, repo)})
        for method, path, _ in list(self.cdn.requests):
            match = re.match(r"^/lfs/([^/]+/[^/]+)/[0-9a-f]{64}/(.+)$", path)
            if method == "GET" and match and repo_id in (None, match[1]):
                counts[match[2]] += 1
        return counts

    def total_requests(self) -> int:
        with self._lock:
            return len(self.requests) + len(self.cdn.requests)

    def reset(self) -> None:
        """Back to the state after start: no faults, delays or missing repos, counters at zero."""
        with self._lock:
            self.missing.clear()
            self.delays.clear()
        for repo_id, revisions_of_repo in list(self.repos.items()):
            for revision in revisions_of_repo.values():
                for file in revision.files.values():
                    if file.lfs:
                        self.cdn.set_fault(self.cdn_path(repo_id, file), None)
        self.reset_counts()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.authorizations.clear()
            self.served.clear()
        self.cdn.reset_counts()

    def _record(self, method: str, path: str, authorization: Optional[str] = None) -> None:
        with self._lock:
            self.requests.append((method, path))
            if authorization:
                self.authorizations.append(authorization)


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

        def _route(self) -> None:
            url = urlsplit(self.path)
            segments = [unquote(part) for part in url.path.split("/")[1:]]
            hub._record(self.command, "/".join([""] + segments), self.headers.get("Authorization"))
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            try:
                if segments[:2] == ["api", "models"] and len(segments) >= 4:
                    repo_id, rest = "/".join(segments[2:4]), segments[4:]
                    if not rest:
                        return self._info(repo_id, None)
                    if rest[0] == "revision" and len(rest) == 2:
                        return self._info(repo_id, rest[1])
                    if rest[0] == "tree" and len(rest) >= 2:
                        return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                elif len(segments) >= 5 and segments[2] == "resolve":
                    return self._resolve("/".join(segments[:2]), segments[3], "/".join(segments[4:]))
                self._error(404, None, "Not Found")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout): nothing to answer

        # -- the API -------------------------------------------------------------------------------------------

        def _revision(self, repo_id: str, revision: Optional[str]):
            """The revision, or None after answering the error the real hub gives."""
            with hub._lock:
                delay = hub.delays.get(repo_id, 0)
                missing = repo_id in hub.missing or repo_id not in hub.repos
                found = None if missing else hub.repos[repo_id].get(revision or "main")
            if delay and hub._closing.wait(delay):
                return None
            if missing:
                self._error(404, "RepoNotFound", "Repository not found")
            elif found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return found

        def _info(self, repo_id: str, revision: Optional[str]) -> None:
            found = self._revision(repo_id, revision)
            if found is None:
                return
            siblings = [
                {"rfilename": f.path, "size": f.size, "blobId": f.oid}
                | ({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}} if f.lfs else {})
                for f in found.files.values()
            ]
            self._json({"_id": found.sha[:24], "id": repo_id, "modelId": repo_id, "sha": found.sha,
                        "private": False, "disabled": False, "gated": False, "tags": [], "siblings": siblings})

        def _tree(self, repo_id: str, revision: str, folder: str, query: dict) -> None:
            found = self._revision(repo_id, revision)
            if found is None:
                return
            recursive = query.get("recursive", "false").lower() == "true"
            prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
            entries, folders = [], set()
            for f in found.files.values():
                if not f.path.startswith(prefix):
                    continue
                rest = f.path[len(prefix):].split("/")
                for depth in range(1, len(rest)):
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(rest[:depth]))
                if len(rest) > 1 and not recursive:
                    continue
                entry = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries.append(entry)
            dirs = [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                    for p in sorted(folders)]
            self._json(dirs + entries)

        # -- files ---------------------------------------------------------------------------------------------

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            found = self._revision(repo_id, revision)
            if found is None:
                return
            file = found.files.get(filename)
            if file is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist", commit=found.sha)
            headers = {"X-Repo-Commit": found.sha, "ETag": f'"{file.oid}"', "Accept-Ranges": "bytes"}
            if file.lfs:
                location = hub.cdn.url(hub.cdn_path(repo_id, file))
                headers |= {"Location": location, "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)}
                return self._send(302, headers, b"")
            start, end = 0, file.size
            match = RANGE.match(self.headers.get("Range") or "")
            if match:
                start = int(match[1])
                end = min(int(match[2]) + 1, file.size) if match[2] else file.size
                if start >= file.size or start >= end:
                    return self._send(416, {"Content-Range": f"bytes */{file.size}"}, b"")
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
            if self.command == "GET":
                with hub._lock:
                    hub.served[(repo_id, filename)] += 1
            self._send(206 if match else 200, headers, file.data[start:end], "application/octet-stream")

        # -- plumbing ------------------------------------------------------------------------------------------

        def _error(self, status: int, code: Optional[str], message: str, commit: Optional[str] = None) -> None:
            headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), "application/json")

        def _json(self, payload) -> None:
            self._send(200, {}, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, headers: dict, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()

    return Handler
