"""A local stand-in for the Hugging Face Hub's HTTP API: a fake, because the real Hub cannot be
reached from these machines. It speaks just what huggingface_hub's ``create_repo``,
``list_repo_files`` and ``create_commit`` send (repos/create, tree, preupload, NDJSON commit), keeps
files in memory, records every attempt to overwrite or delete a file, and can fail commits on
demand: before applying them (``fail_before``) or after applying them with the answer lost
(``fail_after``).

Model repos (``models``) also serve what ``snapshot_download`` reads: repo info, the file tree, and
files under ``/{repo}/resolve/{revision}/{path}`` with HEAD metadata and byte ranges. A repo in
``gated`` answers as a gated model does to a token without access; ``cut_after`` cuts a file
download after that many bytes (a dropped connection), ``stall_after`` stops sending after that many
(``stalled`` is set; ``release`` ends the wait), so that a test can kill the downloader mid-file;
``ranges`` records the Range headers seen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[dict] = []
        self.overwrites: list[str] = []
        self.deletes: list[str] = []
        self.validated = 0
        self.fail_before = 0
        self.fail_after = 0
        self.down = False
        self.organisations: set[str] = set()
        self.models: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo -> commits (sha, files)
        self.tags: dict[str, dict[str, str]] = {}  # model repo -> tag -> commit sha
        self.gated: set[str] = set()
        self.cut_after: int | None = None
        self.stall_after: int | None = None  # send this much of the next big file, then wait
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.ranges: list[str] = []
        self.downloads: list[str] = []  # model files sent (GET), in order
        self.spaces: dict[str, dict[str, bytes]] = {}
        self.space_sdk: dict[str, str | None] = {}
        self.space_variables: dict[str, dict[str, str]] = {}
        self.space_hardware: dict[str, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        return self.repos.get(repo, {})

    def add_model(self, repo: str, files: dict[str, bytes]) -> str:
        """A model repo with one commit holding ``files``; returns the commit sha."""
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.models[repo] = [(sha, dict(files))]
        return sha

    def model_files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return self._revision(repo, revision)[1]

    def _revision(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]]:
        commits = self.models[repo] or [("0" * 40, {})]
        if revision == "main":
            return commits[-1]
        sha = self.tags.get(repo, {}).get(revision, revision)
        return next(c for c in commits if c[0] == sha)

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _model_refusal(self, repo: str) -> bool:
                """Answer as the Hub does for a missing or gated model repo; True if it did."""
                if repo in stub.gated:
                    data = json.dumps({"error": f"Access to model {repo} is restricted. You must have access to it "
                                               "and be authenticated to access it."}).encode()
                    self.send_response(401)
                    self.send_header("X-Error-Code", "GatedRepo")
                elif repo not in stub.models:
                    data = json.dumps({"error": "Repository not found"}).encode()
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                else:
                    return False
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return True

            def _resolve(self, head: bool) -> bool:
                m = re.match(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not m or m.group(2).startswith("api/"):
                    return False
                dataset, repo, revision, path = m.groups()
                if dataset:  # a dataset repo: its current files (the stand-in keeps no history for them)
                    if repo not in stub.repos:
                        self.send_response(404)
                        self.send_header("X-Error-Code", "RepoNotFound")
                        self.end_headers()
                        return True
                    files = stub.repos[repo]
                    sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
                elif self._model_refusal(repo):
                    return True
                else:
                    sha, files = stub._revision(repo, revision)
                if path not in files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return True
                data = files[path]
                start = 0
                if self.headers.get("Range"):
                    stub.ranges.append(self.headers["Range"])
                    start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return True
                body = data[start:]
                stub.downloads.append(path)
                if stub.stall_after is not None and len(body) > stub.stall_after:
                    self.wfile.write(body[:stub.stall_after])
                    self.wfile.flush()
                    stub.stalled.set()
                    stub.release.wait(60)  # until the test has killed the downloader
                    return True
                if stub.cut_after is not None and len(body) > stub.cut_after:
                    body, stub.cut_after = body[:stub.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return True
                self.wfile.write(body)
                return True

            def do_HEAD(self) -> None:
                if not self._resolve(head=True):
                    self.send_response(404)
                    self.end_headers()

            def do_GET(self) -> None:
                if stub.down:
                    return self._send(503, {"error": "down"})
                if self._resolve(head=False):
                    return None
                m = re.match(r"/api/models/([^/]+/[^/]+)/refs", self.path)
                if m:
                    if self._model_refusal(m.group(1)):
                        return None
                    commits = stub.models[m.group(1)]
                    tags = stub.tags.get(m.group(1), {})
                    return self._send(200, {
                        "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": commits[-1][0]}]
                        if commits else [],
                        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in tags.items()],
                        "converts": [], "pullRequests": []})
                m = re.match(r"/api/models/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
                if m:
                    if self._model_refusal(m.group(1)):
                        return None
                    sha, files = stub._revision(m.group(1), m.group(2))
                    return self._send(200, {"id": m.group(1), "sha": sha, "private": False,
                                            "siblings": [{"rfilename": p} for p in sorted(files)]})
                m = re.match(r"/api/models/([^/]+/[^/]+)/tree/([^/?]+)", self.path)
                if m:
                    if self._model_refusal(m.group(1)):
                        return None
                    _, files = stub._revision(m.group(1), m.group(2))
                    return self._send(200, [{"type": "file", "path": p, "size": len(b),
                                             "oid": hashlib.sha1(b).hexdigest()} for p, b in sorted(files.items())])
                m = re.match(r"/api/organizations/([^/?]+)/overview", self.path)
                if m:  # the organisations this stand-in knows; any other name is a user
                    if m.group(1) in stub.organisations:
                        return self._send(200, {"name": m.group(1), "fullname": m.group(1), "avatarUrl": "",
                                                "isFollowing": False, "isVerified": False, "numUsers": 3,
                                                "numModels": 0, "numSpaces": 1, "numDatasets": 0,
                                                "numFollowers": 0, "numPapers": 0, "details": ""})
                    return self._send(404, {"error": "Organization not found"})
                m = re.match(r"/api/datasets/([^/]+/[^/]+)/tree/[^/?]+", self.path)
                if m:
                    repo = stub.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    return self._send(200, [{"type": "file", "path": p, "size": len(b),
                                             "oid": hashlib.sha1(b).hexdigest()} for p, b in sorted(repo.items())])
                m = re.match(r"/api/datasets/([^/]+/[^/]+)(/revision/[^/?]+)?", self.path)
                if m and m.group(1) in stub.repos:
                    return self._send(200, {"id": m.group(1), "sha": f"{len(stub.commits):040x}", "siblings": []})
                return self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self._body()
                if stub.down:
                    return self._send(503, {"error": "down"})
                if self.path.startswith("/api/validate-yaml"):
                    # The Hub checks a README's front matter before a commit; so does the stand-in.
                    import yaml

                    req = json.loads(body)
                    content = req["content"]
                    needs = {"dataset": "configs", "space": "sdk"}.get(req.get("repoType") or "dataset")
                    try:
                        meta = yaml.safe_load(content.split("---")[1])
                        assert isinstance(meta, dict) and (needs is None or needs in meta)
                    except Exception as e:
                        return self._send(400, {"error": f"invalid metadata: {e}"})
                    stub.validated += 1
                    return self._send(200, {"warnings": []})
                if self.path.startswith("/api/repos/create"):
                    req = json.loads(body)
                    name, org = req["name"], req.get("organization") or "user"
                    repo = name if "/" in name else f"{org}/{name}"
                    kind = req.get("type") or "model"
                    store = {"dataset": stub.repos, "space": stub.spaces, "model": stub.models}[kind]
                    if repo in store:
                        return self._send(409, {"error": f"You already created this {kind} repo", "url": repo})
                    store[repo] = [] if kind == "model" else {}
                    if kind == "space":
                        stub.space_sdk[repo] = req.get("sdk")
                    stub.private[repo] = req.get("visibility") == "private" or bool(req.get("private"))
                    return self._send(200, {"url": f"{stub.url}/{kind + 's/' if kind != 'model' else ''}{repo}"})
                m = re.match(r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/preupload/", self.path)
                if m:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                m = re.match(r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/commit/([^/?]+)", self.path)
                if m:
                    kind, name = m.group(1), m.group(2)
                    if kind == "models":
                        if name not in stub.models:
                            return self._send(404, {"error": "Repository not found"})
                        repo = dict(stub.models[name][-1][1]) if stub.models[name] else {}
                    else:
                        repo = (stub.repos if kind == "datasets" else stub.spaces).get(name)
                        if repo is None:
                            return self._send(404, {"error": "Repository not found"})
                    if stub.fail_before:
                        stub.fail_before -= 1
                        return self._send(500, {"error": "injected failure before the commit"})
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    for line in lines:
                        v = line["value"]
                        if line["key"] == "file":
                            if v["path"] in repo:
                                stub.overwrites.append(v["path"])
                            repo[v["path"]] = base64.b64decode(v["content"])
                        elif line["key"] in ("deletedFile", "deletedFolder"):
                            stub.deletes.append(v["path"])
                            gone = v["path"].rstrip("/")
                            for path in [p for p in repo if p == gone or p.startswith(gone + "/")]:
                                del repo[path]
                        elif line["key"] == "lfsFile":
                            return self._send(400, {"error": "the stand-in takes regular uploads only"})
                    stub.commits.append({"repo": name, "paths": [x["value"].get("path") for x in lines[1:]]})
                    oid = hashlib.sha1(f"{name}:{len(stub.commits)}".encode()).hexdigest()
                    if kind == "models":
                        stub.models[name].append((oid, repo))
                    if stub.fail_after:
                        stub.fail_after -= 1
                        return self._send(500, {"error": "injected failure after the commit (answer lost)"})
                    return self._send(200, {"commitUrl": f"{stub.url}/{kind}/{name}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                m = re.match(r"/api/models/([^/]+/[^/]+)/tag/([^/?]+)", self.path)
                if m:
                    tag = json.loads(body)["tag"]
                    tags = stub.tags.setdefault(m.group(1), {})
                    if tag in tags:
                        return self._send(409, {"error": f"tag {tag} already exists"})
                    tags[tag] = stub._revision(m.group(1), m.group(2))[0]
                    return self._send(200, {})
                m = re.match(r"/api/spaces/([^/]+/[^/]+)/variables", self.path)
                if m:
                    req = json.loads(body)
                    stub.space_variables.setdefault(m.group(1), {})[req["key"]] = req["value"]
                    return self._send(200, {k: {"value": v, "updatedAt": "2026-12-02T00:00:00.000Z"}
                                            for k, v in stub.space_variables[m.group(1)].items()})
                m = re.match(r"/api/spaces/([^/]+/[^/]+)/hardware", self.path)
                if m:
                    stub.space_hardware[m.group(1)] = json.loads(body)["flavor"]
                    return self._send(200, {"stage": "BUILDING", "hardware": {
                        "current": None, "requested": stub.space_hardware[m.group(1)]}})
                return self._send(404, {"error": f"not handled: {self.path}"})

        return Handler
