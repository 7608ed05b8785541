"""A local stand-in for the Hugging Face Hub's HTTP API: a fake, because the real Hub cannot be
reached from these machines. It speaks just what huggingface_hub's ``create_repo``,
``list_repo_files`` and ``create_commit`` send (repos/create, tree, preupload, NDJSON commit), keeps
files in memory, records every attempt to overwrite or delete a file, and can fail commits on
demand: before applying them (``fail_before``) or after applying them with the answer lost
(``fail_after``).
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
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()

    def files(self, repo: str) -> dict[str, bytes]:
        return self.repos.get(repo, {})

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

            def do_GET(self) -> None:
                if stub.down:
                    return self._send(503, {"error": "down"})
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

                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---")[1])
                        assert isinstance(meta, dict) and "configs" in meta
                    except Exception as e:
                        return self._send(400, {"error": f"invalid metadata: {e}"})
                    stub.validated += 1
                    return self._send(200, {"warnings": []})
                if self.path.startswith("/api/repos/create"):
                    req = json.loads(body)
                    name, org = req["name"], req.get("organization") or "user"
                    repo = name if "/" in name else f"{org}/{name}"
                    if repo in stub.repos:
                        return self._send(409, {"error": "You already created this dataset repo", "url": repo})
                    stub.repos[repo] = {}
                    stub.private[repo] = req.get("visibility") == "private" or bool(req.get("private"))
                    return self._send(200, {"url": f"{stub.url}/datasets/{repo}"})
                m = re.match(r"/api/datasets/([^/]+/[^/]+)/preupload/", self.path)
                if m:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                m = re.match(r"/api/datasets/([^/]+/[^/]+)/commit/", self.path)
                if m:
                    repo = stub.repos.get(m.group(1))
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
                        elif line["key"] == "lfsFile":
                            return self._send(400, {"error": "the stand-in takes regular uploads only"})
                    stub.commits.append({"repo": m.group(1), "paths": [x["value"].get("path") for x in lines[1:]]})
                    if stub.fail_after:
                        stub.fail_after -= 1
                        return self._send(500, {"error": "injected failure after the commit (answer lost)"})
                    oid = f"{len(stub.commits):040x}"
                    return self._send(200, {"commitUrl": f"{stub.url}/datasets/{m.group(1)}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                return self._send(404, {"error": f"not handled: {self.path}"})

        return Handler
