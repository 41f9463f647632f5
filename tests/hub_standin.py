"""A local stand-in for the Hugging Face Hub: the few HTTP routes `miva.hub` reaches through huggingface_hub.

Serves on loopback from a thread; repos and collections live in memory. Routes (huggingface_hub 2.4):

  GET  /api/collections/{owner}/{slug}            HfApi.get_collection
  GET  /api/models/{repo}/revision/{rev}          HfApi.model_info / repo_info (snapshot_download step 1)
  GET  /api/models/{repo}/tree/{rev}              HfApi.list_repo_tree (snapshot_download step 2)
  HEAD /{repo}/resolve/{rev}/{path}               file metadata: ETag, X-Repo-Commit, Content-Length
  GET  /{repo}/resolve/{rev}/{path}               file bytes
  POST /api/repos/create                          HfApi.create_repo
  POST /api/validate-yaml                         upload_folder checks the README.md front matter
  POST /api/models/{repo}/preupload/{rev}         upload modes: always "regular" (no LFS, no Xet)
  POST /api/models/{repo}/commit/{rev}            the NDJSON commit

No X-Xet-* headers and no LFS pointers are ever sent, so huggingface_hub takes its plain HTTP paths.
Error answers carry the Hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound),
which huggingface_hub turns into its typed errors. Anything else is a 404.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

USER = "miva-tester"
WRITE_TOKEN = "hf_standin_write"
READ_TOKEN = "hf_standin_read"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    sha: str = "0" * 40
    private: bool = False

    def commit(self, files: dict[str, bytes], message: str) -> str:
        digest = hashlib.sha1(self.sha.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        self.sha, self.files = digest.hexdigest(), dict(files)
        self.history[self.sha] = self.files
        return self.sha

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.sha, self.files
        if revision in self.history:
            return revision, self.history[revision]
        return None


class HubStandIn:
    """The stand-in server. `url` is what HF_ENDPOINT / huggingface_hub.constants.ENDPOINT should be."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, list[tuple[str, str]]] = {}  # slug -> [(item type, item id)]
        self.tokens = {WRITE_TOKEN: "write", READ_TOKEN: "read"}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.stall: dict[str, threading.Event] = {}  # path prefix -> answer only once the event is set
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- test helpers ---------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        for event in self.stall.values():
            event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def put_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create (or overwrite) a model repo directly, as if someone had pushed it."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            return repo.commit(files, "seeded by the test")

    def add_to_collection(self, slug: str, repo_id: str, item_type: str = "model") -> None:
        with self.lock:
            self.collections.setdefault(slug, []).append((item_type, repo_id))

    def paths(self, method: str | None = None) -> list[str]:
        with self.lock:
            return [path for m, path in self.requests if method is None or m == method]


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.0"  # one request per connection: nothing pooled outlives the server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), headers, head=head)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False, **headers) -> None:
        extra = {"X-Error-Message": message, **headers}
        if code:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, extra, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _can_write(self, namespace: str) -> bool:
        """Answers 401/403 itself when the caller may not write to `namespace`."""
        token = self._token()
        if token not in self.hub.tokens:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        if self.hub.tokens[token] != "write" or namespace != USER:
            self._error(403, f"You don't have the rights to write to the namespace {namespace}")
            return False
        return True

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.hub.tokens.get(self._token()) is None):
            self._error(401 if repo is not None else 404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        for prefix, event in list(self.hub.stall.items()):
            if path.startswith(prefix):
                event.wait(10)
        parts = path.strip("/").split("/")
        try:
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
            if method == "GET" and parts[:2] == ["api", "collections"] and len(parts) == 4:
                return self._collection("/".join(parts[2:]))
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
                if method == "GET" and action == "revision":
                    return self._model_info(repo_id, revision)
                if method == "GET" and action == "tree":
                    return self._tree(repo_id, revision)
                if method == "POST" and action == "preupload":
                    return self._preupload(repo_id)
                if method == "POST" and action == "commit":
                    return self._commit(repo_id, revision)
            if method == "POST" and path == "/api/repos/create":
                return self._create()
            if method == "POST" and path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            self._error(404, f"the stand-in does not serve {method} {path}", head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    # -- routes ---------------------------------------------------------------------------------
    def _collection(self, slug: str) -> None:
        with self.hub.lock:
            items = self.hub.collections.get(slug)
        if items is None:
            return self._error(404, "Collection not found")
        owner = slug.split("/")[0]
        self._json(200, {
            "slug": slug, "title": "MIVA adapters", "description": "Motion adapters for MIVA Studio",
            "owner": {"name": owner, "type": "user"}, "lastUpdated": "2025-01-01T00:00:00.000Z",
            "position": 0, "private": False, "theme": "indigo", "upvotes": 0,
            "items": [{"_id": hashlib.sha1(item_id.encode()).hexdigest()[:24], "id": item_id, "type": item_type,
                       "position": i, "author": item_id.split("/")[0]}
                      for i, (item_type, item_id) in enumerate(items)],
        })

    def _revision(self, repo_id: str, revision: str):
        """(repo, (sha, files)) of a repo at a revision, or None once an error has been answered."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        found = repo.at(revision)
        if found is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, found

    def _model_info(self, repo_id: str, revision: str) -> None:
        if (hit := self._revision(repo_id, revision)) is None:
            return
        repo, (sha, files) = hit
        self._json(200, {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                         "private": repo.private, "tags": ["miva"], "library_name": "miva",
                         "siblings": [{"rfilename": name} for name in sorted(files)]})

    def _tree(self, repo_id: str, revision: str) -> None:
        if (hit := self._revision(repo_id, revision)) is None:
            return
        _, (_, files) = hit
        self._json(200, [{"type": "file", "path": name, "size": len(data), "oid": git_blob_oid(data)}
                         for name, data in sorted(files.items())])

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        found = repo.at(revision)
        if found is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
        sha, files = found
        if filename not in files:
            return self._error(404, "Entry not found", "EntryNotFound", head=head, **{"X-Repo-Commit": sha})
        data = files[filename]
        self._send(200, data, {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": sha},
                   content_type="application/octet-stream", head=head)

    def _create(self) -> None:
        payload = json.loads(self._body() or b"{}")
        namespace = payload.get("organization") or USER
        if not self._can_write(namespace):
            return
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id})

    def _preupload(self, repo_id: str) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._can_write(repo_id.split("/")[0]) or self._repo(repo_id) is None:
            return
        files = self.hub.repos[repo_id].files
        self._json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
            for f in payload["files"]
        ]})

    def _commit(self, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._can_write(repo_id.split("/")[0]):
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision != "main":
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files, summary = dict(repo.files), ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile etc.: the stand-in never asked for LFS
                return self._error(400, f"the stand-in does not accept '{key}' commit lines")
        with self.hub.lock:
            sha = repo.commit(files, summary)
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}"})
