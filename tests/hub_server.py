"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests of the real ``huggingface_hub`` client.

Listens on 127.0.0.1 (a free port) in a daemon thread; stops itself after ``lifetime``
seconds and refuses requests beyond ``max_requests``, so a test can neither hang on it
nor hammer it. Implements what hfplug's Hub code sends through the real client (``HfApi.whoami``,
``auth_check``, ``model_info``, ``create_repo``, ``upload_folder``; a fixture fails a test whose
client asked for anything else):

- ``GET  /api/whoami-v2`` (user, orgs with ``roleInOrg``, ``auth.accessToken.role`` and
  ``fineGrained.scoped`` like the Hub answers);
- ``POST /api/repos/create`` (409 + url when it exists, 403 without the right to create);
- ``POST /api/validate-yaml`` (model card metadata);
- ``GET  /api/models/{repo}`` and ``/revision/{rev}`` (model info), ``/auth-check[/write]``;
- ``GET  /api/agent-harnesses`` (huggingface_hub's agent-detection registry: empty);
- ``POST /api/models/{repo}/preupload/{rev}`` (every file "regular", with the remote ``oid``
  so that unchanged files are skipped) and ``/commit/{rev}`` (ndjson, applied atomically);
- ``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}`` (dataset files, added with ``add_dataset``;
  ``rev`` is ``main`` or the repo's sha): the headers ``hf_hub_download`` and
  ``get_hf_file_metadata`` read (``X-Repo-Commit``, ``ETag``, ``Content-Length``), and a
  ``Range: bytes=a-b`` (or ``a-``) answered 206 with ``Content-Range`` (416 past the end). With
  ``cdn=True`` it answers 302 to ``http://localhost:{port}/cdn/{sha256}`` instead, with the
  ``X-Linked-Size``/``X-Linked-Etag`` headers the Hub puts on its LFS redirects; localhost is
  another origin than 127.0.0.1, so the client drops the token there, and ``/cdn/`` answers a
  request that carries one 400 (as S3 does a signed URL with an Authorization header).
- dataset repos to push to: ``POST /api/repos/create`` with ``type: dataset`` (into ``datasets``),
  ``GET /api/datasets/{repo}`` (dataset info), ``/tree/{rev}`` (the file list ``upload_folder``'s
  ``delete_patterns`` reads), ``POST /api/datasets/{repo}/preupload/{rev}`` and ``/commit/{rev}``
  (as for models; ``commits`` records them too).

Tokens are described by ``Token`` (valid write, read-only, fine-grained scoped, revoked).
Each commit is recorded (``commits``: repo, message, files and their bytes).
``interrupt_commits()`` makes the next commit request hang until ``release_commits()`` and
then drop the connection unapplied: a push interrupted half-way. ``fail_commits`` answers
commits with that HTTP status instead; ``echo_authorization`` makes every error answer repeat
the request's Authorization header (as a careless proxy or server might), so that tests can
check no token reaches a message or traceback through the client's exception.

For the dataset files: ``ranges=False`` makes the server ignore ``Range`` (200 and the whole
body, no ``Accept-Ranges``, as some proxies do); ``drop_once(path, offset)`` cuts the next
answer for ``path`` that reaches byte ``offset`` right there (the connection just drops);
``sent[path]`` counts the body bytes actually written for each file; ``file_requests`` records
each request for a file (method, route, Range header, status, the token's user).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
MAX_BODY = 64 * 2**20


@dataclass
class Token:
    """How the fake Hub treats one token value."""

    user: str
    role: str = "write"  # "read", "write" or "fineGrained"
    scoped: list = field(default_factory=list)  # fine-grained: [{"entity": {"type", "name"}, "permissions": [...]}]
    revoked: bool = False
    gated_access: tuple = ()  # gated repos this account was granted
    can_read_gated: bool = True  # fine-grained "canReadGatedRepos"
    display_name: str = "hfplug-test"


def fine_grained(user: str, *, namespaces=(), repos=(), write=True, can_read_gated=True, **kwargs) -> Token:
    """A fine-grained token with write (or only read) access to whole namespaces and/or single model repos."""
    perms = ["repo.content.read", "repo.write"] if write else ["repo.content.read"]
    scoped = [
        {"entity": {"_id": f"id-{ns}", "type": "org" if ns != user else "user", "name": ns}, "permissions": perms}
        for ns in namespaces
    ]
    scoped += [{"entity": {"_id": f"id-{r}", "type": "model", "name": r}, "permissions": perms} for r in repos]
    return Token(user, "fineGrained", scoped, can_read_gated=can_read_gated, **kwargs)


def git_hash(data: bytes) -> str:
    """``git hash-object`` of ``data`` (the oid the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    repo_id: str
    summary: str
    files: dict  # path -> bytes added or replaced by this commit
    deleted: list
    oid: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    card_data: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    sha: str = "0" * 40


@dataclass
class FileRequest:
    """One request for a dataset file: ``route`` is "resolve" or "cdn"; ``user`` the token's user (None: no token)."""

    method: str
    path: str
    route: str
    range: str | None
    status: int
    user: str | None


def _file_bytes(data) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else data


class HubServer:
    """The fake Hub. Use as a context manager; ``url`` is the endpoint to give the client."""

    def __init__(
        self,
        tokens: dict | None = None,
        orgs: dict | None = None,
        *,
        max_requests: int = 400,
        lifetime: float = 120.0,
        echo_authorization: bool = False,
        fail_commits: int | None = None,
        ranges: bool = True,
        cdn: bool = False,
    ):
        self.tokens: dict[str, Token] = dict(tokens or {})
        self.orgs: dict[str, dict[str, str]] = dict(orgs or {})  # org -> {user: roleInOrg}
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.max_requests = max_requests
        self.echo_authorization = echo_authorization
        self.fail_commits = fail_commits
        self.datasets: dict[str, Repo] = {}
        self.ranges = ranges
        self.cdn = cdn
        self.sent: Counter = Counter()  # dataset file path -> body bytes written
        self.file_requests: list[FileRequest] = []
        self._drops: dict[str, int] = {}  # path -> file offset where the next answer reaching it is cut
        self._cdn_blobs: dict[str, tuple[Repo, str]] = {}  # sha256 -> (repo, path)
        self.lifetime = lifetime
        self.lock = threading.RLock()
        self.commit_received = threading.Event()
        self._interrupt = False
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None
        self._connections: list[socket.socket] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open (keep-alive) connection: the network is gone."""
        self._release.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()
        with self.lock:
            connections, self._connections = self._connections, []
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test controls

    def add_repo(self, repo_id: str, *, files: dict | None = None, private=False, gated=False, card_data=None) -> Repo:
        with self.lock:
            repo = Repo(
                repo_id, private, gated, dict(card_data or {}), {".gitattributes": GITATTRIBUTES, **(files or {})}
            )
            repo.sha = hashlib.sha1(repo_id.encode()).hexdigest()
            self.repos[repo_id] = repo
            return repo

    def add_dataset(self, repo_id: str, *, files: dict, private=False, gated=False) -> Repo:
        """A dataset repo; ``files`` maps repo paths to bytes or to a local ``Path`` (read when served)."""
        with self.lock:
            repo = Repo(repo_id, private, gated, {}, dict(files))
            repo.sha = hashlib.sha1(b"dataset " + repo_id.encode()).hexdigest()
            self.datasets[repo_id] = repo
            return repo

    def drop_once(self, path: str, offset: int) -> None:
        """Cut the next answer for ``path`` whose body reaches byte ``offset`` of the file, once, right there."""
        with self.lock:
            self._drops[path] = offset

    def interrupt_commits(self) -> None:
        """Hold the next commit requests until ``release_commits``, then drop them unapplied."""
        self._interrupt = True
        self._release.clear()
        self.commit_received.clear()

    def release_commits(self) -> None:
        self._interrupt = False
        self._release.set()

    def files(self, repo_id: str) -> dict:
        with self.lock:
            return dict(self.repos[repo_id].files)

    # ------------------------------------------------------------------ permissions (as the Hub decides)

    def member_role(self, user: str, namespace: str) -> str | None:
        if namespace == user:
            return "admin"
        return self.orgs.get(namespace, {}).get(user)

    def _scoped(self, token: Token, repo_id: str | None, namespace: str, perm: str) -> bool:
        for entry in token.scoped:
            entity, perms = entry["entity"], entry["permissions"]
            if perm in perms and (
                (entity["type"] in ("user", "org") and entity["name"] == namespace)
                or (repo_id is not None and entity["type"] in ("model", "dataset") and entity["name"] == repo_id)
            ):
                return True
        return False

    def can_create(self, token: Token, namespace: str) -> bool:
        role = self.member_role(token.user, namespace)
        if role in (None, "read") or token.role == "read":
            return False
        return token.role == "write" or self._scoped(token, None, namespace, "repo.write")

    def can_write(self, token: Token, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        role = self.member_role(token.user, namespace)
        if role in (None, "read") or token.role == "read":
            return False
        return token.role == "write" or self._scoped(token, repo_id, namespace, "repo.write")

    def can_read(self, token: Token | None, repo: Repo) -> bool:
        if repo.private:
            return token is not None and self.member_role(token.user, repo.repo_id.split("/")[0]) is not None
        if repo.gated:
            return (
                token is not None
                and repo.repo_id in token.gated_access
                and (token.role != "fineGrained" or token.can_read_gated)
            )
        return True

    def whoami_payload(self, token: Token) -> dict:
        orgs = [
            {
                "type": "org",
                "id": f"id-{org}",
                "name": org,
                "fullname": org.title(),
                "roleInOrg": members[token.user],
                "isEnterprise": False,
                "avatarUrl": "",
            }
            for org, members in sorted(self.orgs.items())
            if token.user in members
        ]
        access = {"displayName": token.display_name, "role": token.role, "createdAt": "2026-01-01T00:00:00.000Z"}
        if token.role == "fineGrained":
            access["fineGrained"] = {
                "canReadGatedRepos": token.can_read_gated,
                "global": ["discussion.write"],
                "scoped": token.scoped,
            }
        return {
            "type": "user",
            "id": f"id-{token.user}",
            "name": token.user,
            "fullname": token.user.title(),
            "email": f"{token.user}@example.invalid",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": access},
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer  # set on the subclass made in HubServer.start

    def log_message(self, format, *args):  # quiet: the test output stays readable
        pass

    def setup(self):
        super().setup()
        with self.hub.lock:
            self.hub._connections.append(self.connection)

    # ------------------------------------------------------------------ plumbing

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
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, *, error_code: str | None = None, error_message: str | None = None):
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", "test-hub")
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if error_message:
            self.send_header("X-Error-Message", error_message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None):
        if self.hub.echo_authorization and self.headers.get("Authorization"):
            message = f"{message} (request had Authorization: {self.headers['Authorization']})"
        self._send(status, {"error": message}, error_code=code, error_message=message)

    def _token(self) -> tuple[Token | None, bool]:
        """(token, valid): ``(None, True)`` without an Authorization header."""
        header = self.headers.get("Authorization") or ""
        if not header.lower().startswith("bearer "):
            return None, True
        token = self.hub.tokens.get(header[7:].strip())
        return (token, True) if token is not None and not token.revoked else (None, False)

    def _dispatch(self, method: str):
        path = unquote(urlsplit(self.path).path)
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
            over = len(hub.requests) > hub.max_requests
        if over:
            return self._error(400, "test hub: request budget exhausted")
        try:
            body = self._body() if method == "POST" else b""
        except ValueError as err:
            return self._error(413, str(err))
        token, valid = self._token()
        if not valid:
            return self._error(401, INVALID_CREDENTIALS)
        for pattern, name in ROUTES.get(method, ()):
            match = re.fullmatch(pattern, path)
            if match:
                return getattr(self, name)(token, body, **match.groupdict())
        with hub.lock:
            hub.unhandled.append((method, path))
        return self._error(404, f"test hub: no route for {method} {path}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ------------------------------------------------------------------ endpoints

    def whoami(self, token, body):
        if token is None:
            return self._error(401, INVALID_CREDENTIALS)
        self._send(200, self.hub.whoami_payload(token))

    def agent_harnesses(self, token, body):
        """The registry huggingface_hub fetches once a day to detect AI agents: an empty one."""
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, token, body):
        if token is None:
            return self._error(401, INVALID_CREDENTIALS)
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or token.user
        repo_id = f"{namespace}/{payload['name']}"
        hub = self.hub
        if payload.get("type") == "dataset":
            return self._create_dataset(token, payload, namespace, repo_id)
        with hub.lock:
            if repo_id in hub.repos:
                return self._send(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                    error_message="You already created this model repo",
                )
            if not hub.can_create(token, namespace):
                return self._error(
                    403, f'You don\'t have the rights to create a model under the namespace "{namespace}"'
                )
            hub.add_repo(repo_id, private=payload.get("visibility") == "private")
        self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": f"id-{repo_id}"})

    def _create_dataset(self, token, payload, namespace, repo_id):
        hub = self.hub
        with hub.lock:
            if repo_id in hub.datasets:
                return self._send(
                    409,
                    {"error": "You already created this dataset repo", "url": f"{hub.url}/datasets/{repo_id}"},
                    error_message="You already created this dataset repo",
                )
            if not hub.can_create(token, namespace):
                return self._error(
                    403, f'You don\'t have the rights to create a dataset under the namespace "{namespace}"'
                )
            hub.add_dataset(
                repo_id, files={".gitattributes": GITATTRIBUTES}, private=payload.get("visibility") == "private"
            )
        self._send(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id, "id": f"id-{repo_id}"})

    def validate_yaml(self, token, body):
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as err:
                meta, errors = {}, [{"message": f"invalid YAML: {err}"}]
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            else:
                bases = meta.get("base_model") or []
                for base in [bases] if isinstance(bases, str) else bases:
                    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", str(base)):
                        errors.append({"message": f'"base_model" is not a valid model id: {base}'})
                if "model-index" in meta and not isinstance(meta["model-index"], list):
                    errors.append({"message": '"model-index" must be a list'})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo(self, token, ns, name) -> Repo | None:
        repo = self.hub.repos.get(f"{ns}/{name}")
        if repo is None or not self.hub.can_read(token, repo) and not repo.gated:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def model_info(self, token, body, ns, name, rev=None):
        repo = self._repo(token, ns, name)
        if repo is None:
            return
        self._send(
            200,
            {
                "_id": f"id-{repo.repo_id}",
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                "cardData": repo.card_data,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "createdAt": "2026-01-01T00:00:00.000Z",
                "lastModified": "2026-01-01T00:00:00.000Z",
            },
        )

    def auth_check(self, token, body, ns, name, write=None):
        repo = self._repo(token, ns, name)
        if repo is None:
            return
        if write and (token is None or not self.hub.can_write(token, repo.repo_id)):
            return self._error(403, f"You don't have write access to {repo.repo_id}")
        if not self.hub.can_read(token, repo):
            return self._error(
                403,
                f"Access to model {repo.repo_id} is restricted. You must have access to it and "
                "be authenticated to access it. Please log in.",
                "GatedRepo",
            )
        self._send(200, {})

    def _writable(self, token, ns, name, repos=None) -> Repo | None:
        repo_id = f"{ns}/{name}"
        repo = (self.hub.repos if repos is None else repos).get(repo_id)
        if repo is None or token is None or self.hub.member_role(token.user, ns) is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if not self.hub.can_write(token, repo_id):
            self._error(403, f"You don't have write access to {repo_id}")
            return None
        return repo

    def preupload(self, token, body, ns, name, rev, repos=None):
        repo = self._writable(token, ns, name, repos)
        if repo is None:
            return
        files = json.loads(body or b"{}").get("files", [])
        self._send(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_hash(_file_bytes(repo.files[f["path"]])) if f["path"] in repo.files else None,
                    }
                    for f in files
                ],
                "commitOid": repo.sha,
            },
        )

    def commit(self, token, body, ns, name, rev, repos=None):
        hub = self.hub
        if hub._interrupt:
            hub.commit_received.set()
            hub._release.wait(timeout=hub.lifetime)
            self.close_connection = True  # no answer at all: the connection just drops
            return
        repo = self._writable(token, ns, name, repos)
        if repo is None:
            return
        if hub.fail_commits:
            return self._error(hub.fail_commits, "test hub: commit refused")
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"test hub: unsupported commit operation {key!r}")
        with hub.lock:
            for path in deleted:
                for existing in [p for p in repo.files if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del repo.files[existing]
            repo.files.update(added)
            repo.sha = hashlib.sha1(
                (repo.sha + json.dumps(sorted((p, git_hash(b)) for p, b in added.items()))).encode()
            ).hexdigest()
            hub.commits.append(Commit(repo.repo_id, header.get("summary", ""), added, deleted, repo.sha))
        self._send(
            200,
            {
                "success": True,
                "commitOid": repo.sha,
                "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{repo.sha}",
                "commitMessage": header.get("summary", ""),
                "pullRequestUrl": None,
            },
        )

    # ------------------------------------------------------------------ dataset repos (push)

    def _dataset(self, token, ns, name) -> Repo | None:
        repo = self.hub.datasets.get(f"{ns}/{name}")
        if repo is None or not self.hub.can_read(token, repo):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def dataset_info(self, token, body, ns, name, rev=None):
        repo = self._dataset(token, ns, name)
        if repo is not None:
            self._send(
                200,
                {
                    "_id": f"id-{repo.repo_id}",
                    "id": repo.repo_id,
                    "sha": repo.sha,
                    "private": repo.private,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                    "cardData": repo.card_data,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "lastModified": "2026-01-01T00:00:00.000Z",
                },
            )

    def dataset_tree(self, token, body, ns, name, rev):
        """Every file of the repo (as ``recursive=true`` lists them), in one page."""
        repo = self._dataset(token, ns, name)
        if repo is not None:
            with self.hub.lock:
                files = {path: _file_bytes(data) for path, data in repo.files.items()}
            entries = [
                {"type": "file", "path": p, "size": len(b), "oid": git_hash(b)} for p, b in sorted(files.items())
            ]
            self._send(200, entries)

    def dataset_preupload(self, token, body, ns, name, rev):
        self.preupload(token, body, ns, name, rev, repos=self.hub.datasets)

    def dataset_commit(self, token, body, ns, name, rev):
        self.commit(token, body, ns, name, rev, repos=self.hub.datasets)

    # ------------------------------------------------------------------ dataset files

    def resolve(self, token, body, ns, name, rev, path):
        hub = self.hub
        repo = hub.datasets.get(f"{ns}/{name}")
        if repo is None or not hub.can_read(token, repo) and not repo.gated:
            return self._error(404, "Repository not found", "RepoNotFound")
        if not hub.can_read(token, repo):
            return self._error(403, f"Access to dataset {repo.repo_id} is restricted.", "GatedRepo")
        if rev not in ("main", repo.sha):
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if path not in repo.files:
            self._log_file(path, "resolve", 404, token)
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        data = _file_bytes(repo.files[path])
        sha256 = hashlib.sha256(data).hexdigest()
        if not hub.cdn:
            return self._send_file(repo, path, data, "resolve", token, {"ETag": f'"{sha256}"'})
        with hub.lock:
            hub._cdn_blobs[sha256] = (repo, path)
        self._log_file(path, "resolve", 302, token)
        self.send_response(302)
        port = hub._httpd.server_address[1]
        self.send_header("Location", f"http://localhost:{port}/cdn/{sha256}")
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{sha256}"')
        self.send_header("X-Linked-Etag", f'"{sha256}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def cdn(self, token, body, sha256):
        """The CDN behind the Hub's redirect: signed URLs only, so a request carrying a token is refused."""
        entry = self.hub._cdn_blobs.get(sha256)
        if entry is None:
            return self._error(404, "NoSuchKey")
        repo, path = entry
        if self.headers.get("Authorization"):
            self._log_file(path, "cdn", 400, token)
            return self._error(400, "Only one auth mechanism allowed")
        self._send_file(repo, path, _file_bytes(repo.files[path]), "cdn", None, {"ETag": f'"{sha256}"'})

    def _log_file(self, path, route, status, token):
        with self.hub.lock:
            self.hub.file_requests.append(
                FileRequest(self.command, path, route, self.headers.get("Range"), status, token and token.user)
            )

    def _send_file(self, repo, path, data, route, token, headers):
        """Answer with ``data``: whole (200) or the range asked for (206), cut where ``drop_once`` says."""
        hub, size = self.hub, len(data)
        start, end, status = 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if hub.ranges and match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, size) if match.group(2) else size
            if start >= size or end <= start:
                self._log_file(path, route, 416, token)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            status = 206
        self._log_file(path, route, status, token)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("X-Repo-Commit", repo.sha)
        for key, value in headers.items():
            self.send_header(key, value)
        if hub.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub.lock:
            cut = hub._drops.get(path)
            if cut is not None and start <= cut < end:
                del hub._drops[path]
            else:
                cut = None
        stop = end if cut is None else cut
        piece = b""
        try:
            for offset in range(start, stop, 1 << 16):
                piece = data[offset : min(offset + (1 << 16), stop)]
                with hub.lock:  # counted before the client can see it, so a finished client reads a final count
                    hub.sent[path] += len(piece)
                self.wfile.write(piece)
            self.wfile.flush()
        except OSError:  # the client hung up: that piece did not go
            with hub.lock:
                hub.sent[path] -= len(piece)
            self.close_connection = True
            return
        if cut is not None:  # the network drops: no more bytes, no clean end
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_REPO = r"/api/models/(?P<ns>[\w.\-]+)/(?P<name>[\w.\-]+)"
_RESOLVE = r"/datasets/(?P<ns>[\w.\-]+)/(?P<name>[\w.\-]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
_CDN = r"/cdn/(?P<sha256>[0-9a-f]{64})"
_DATASET = r"/api/datasets/(?P<ns>[\w.\-]+)/(?P<name>[\w.\-]+)"
ROUTES = {
    "GET": (
        (r"/api/whoami-v2", "whoami"),
        (r"/api/agent-harnesses", "agent_harnesses"),
        (_REPO + r"/auth-check(?P<write>/write)?", "auth_check"),
        (_REPO + r"(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        (_RESOLVE, "resolve"),
        (_CDN, "cdn"),
        (_DATASET + r"/tree/(?P<rev>[^/]+)", "dataset_tree"),
        (_DATASET + r"(?:/revision/(?P<rev>[^/]+))?", "dataset_info"),
    ),
    "HEAD": ((_RESOLVE, "resolve"), (_CDN, "cdn")),
    "POST": (
        (r"/api/repos/create", "create_repo"),
        (r"/api/validate-yaml", "validate_yaml"),
        (_REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        (_REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        (_DATASET + r"/preupload/(?P<rev>[^/]+)", "dataset_preupload"),
        (_DATASET + r"/commit/(?P<rev>[^/]+)", "dataset_commit"),
    ),
}
