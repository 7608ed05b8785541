"""The Hugging Face Space: its files, its login, its storage, and the GPU plan.

`docker build` cannot run here, so the Dockerfile and the README's front matter are parsed and
checked for what the Space needs; the app itself is started with the environment a Space with
`hf_oauth: true` provides, against a local OpenID provider stand-in (the Hub's OAuth server
cannot be reached from here), and must switch to "Sign in with Hugging Face".

    .venv/bin/python -m pytest tests/test_space.py
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from app import auth_mode, default_data_dir, parse_args
from collector.errors import EngineError
from collector.gpu import ModelShape, plan_for
from tests.conftest import ROOT, RunningApp

# -- the Space's files -------------------------------------------------------------------------


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(m.group(1))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_front_matter_declares_a_docker_space_with_oauth_on_a_card_that_fits_7b():
    from huggingface_hub import SpaceHardware, SpaceStorage

    fm = front_matter()
    assert fm["sdk"] == "docker"
    assert fm["hf_oauth"] is True
    assert fm["suggested_hardware"] in {h.value for h in SpaceHardware}
    # A 7B server and its QLoRA trainer need a 24 GB card at least (collector/gpu.py).
    assert fm["suggested_hardware"] not in {"cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium",
                                            "a10g-small"}
    assert fm["suggested_storage"] in {s.value for s in SpaceStorage}  # /data: votes survive rebuilds
    ops = dockerfile()
    exposed = [int(a) for op, a in ops if op == "EXPOSE"]
    assert exposed == [fm["app_port"]]
    cmd = json.loads(next(a for op, a in ops if op == "CMD"))
    assert cmd[:2] == ["python", "app.py"]
    args = parse_args(cmd[2:])
    assert args.port == fm["app_port"] and args.host == "0.0.0.0"


def project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_dockerfile_agrees_with_the_project_metadata():
    from packaging.specifiers import SpecifierSet

    ops = dockerfile()
    base = next(a for op, a in ops if op == "FROM")
    m = re.fullmatch(r"python:(\d+\.\d+)(-slim)?", base)
    assert m, f"the image's Python must be an official python image, got {base}"
    assert m.group(1) + ".0" in SpecifierSet(project()["requires-python"])  # the project's own Python
    runs = " && ".join(a for op, a in ops if op == "RUN")
    # every pin comes from pyproject.toml: torch on its own, then the runtime pins and the CUDA engine
    assert 'pip install "$(python scripts/requirements.py --only torch)"' in runs
    assert "python scripts/requirements.py cuda" in runs
    assert not re.search(r"==\d", runs), "a version is written in the Dockerfile instead of pyproject.toml"
    copied = " ".join(a for op, a in ops if op == "COPY")
    assert "pyproject.toml" in copied and "scripts/requirements.py" in copied
    assert "pip install --no-deps --no-build-isolation -e ." in runs  # the vLLM plugin's entry point
    entry = json.loads(next(a for op, a in ops if op == "ENTRYPOINT"))
    script = ROOT / entry[-1]
    assert script.exists() and script.stat().st_mode & 0o111
    assert 'exec "$@"' in script.read_text()
    assert next(a for op, a in ops if op == "USER") == "user"  # Spaces run as uid 1000


def test_every_pin_is_written_once_and_requirements_txt_is_generated_from_it():
    deps = project()["dependencies"]
    extras = project()["optional-dependencies"]
    everything = deps + [p for e in extras.values() for p in e]
    assert all("==" in p for p in everything), [p for p in everything if "==" not in p]
    names = [p.split("==")[0].lower() for p in everything]
    assert len(names) == len(set(names)), "a package is pinned twice"
    assert [p for p in deps if p.startswith("torch==")] and not any(p.startswith("torch") for e in extras.values()
                                                                    for p in e)
    # The CUDA engine is the same vLLM release as the CPU one the tests run.
    assert extras["cuda"][0].split("==")[1] == extras["cpu"][0].split("==")[1]
    out = subprocess.run([sys.executable, "scripts/requirements.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    # what the code imports is declared (the rest arrives with these, at the pinned versions)
    for module, dist in (("httpx", "httpx"), ("pandas", "pandas"), ("safetensors", "safetensors"),
                         ("tqdm", "tqdm"), ("pyarrow", "pyarrow"), ("nh3", "nh3"), ("markdown_it", "markdown-it-py"),
                         ("starlette", "starlette"), ("filelock", "filelock"), ("yaml", "pyyaml")):
        assert dist in names, module
    for script in ("scripts/install.sh",):  # nothing else pins a version
        assert not re.search(r"torch==\d", (ROOT / script).read_text())


def test_the_cuda_dependency_set_resolves_for_the_images_python(cuda_resolution):
    """Asks the package index (pip install --dry-run, metadata only: tests/prestart.py, started with
    the run) whether the image's dependency set resolves for Python 3.11 on x86_64 Linux, as the
    Space will install it. Skipped, and says so, when the index cannot be reached."""
    if isinstance(cuda_resolution, str):
        pytest.skip(cuda_resolution)
    code, output, report = cuda_resolution
    assert code == 0, output
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert chosen["vllm"] == "0.32.0" and chosen["torch"].split("+")[0] == "2.13.0"
    assert any(name.startswith("nvidia-") for name in chosen)  # the CUDA build, with its CUDA libraries


def test_the_data_dir_goes_to_persistent_storage_on_a_space(tmp_path):
    persistent = tmp_path / "data"
    persistent.mkdir()
    space = {"SPACE_ID": "me/prefloop"}
    assert default_data_dir(space, persistent) == persistent / "prefloop"
    assert default_data_dir({}, persistent) == Path("data")
    assert default_data_dir(space, tmp_path / "missing") == Path("data")  # no persistent storage bought
    assert default_data_dir({**space, "PREFLOOP_DATA_DIR": "/x"}, persistent) == Path("/x")


SPACE_ENV = {"SYSTEM": "spaces", "SPACE_ID": "me/prefloop", "OAUTH_CLIENT_ID": "abc", "OAUTH_CLIENT_SECRET": "s",
             "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": "https://huggingface.co"}


def test_auth_mode_is_hf_only_on_a_real_space_with_oauth():
    args = parse_args([])
    assert auth_mode(args, SPACE_ENV) == "hf"
    # Without SYSTEM=spaces Gradio mocks the login (anyone becomes HF_TOKEN's owner); without the
    # secret it signs cookies with a public constant: neither is a Space with OAuth.
    for missing in ("SYSTEM", "OAUTH_CLIENT_SECRET", "OAUTH_CLIENT_ID"):
        assert auth_mode(args, {k: v for k, v in SPACE_ENV.items() if k != missing}) == "password", missing
    assert auth_mode(args, {**SPACE_ENV, "SYSTEM": "local"}) == "password"
    assert auth_mode(args, {"SPACE_ID": "me/prefloop"}) == "password"  # hf_oauth not set in the README
    assert auth_mode(args, {}) == "password"
    assert auth_mode(parse_args(["--auth", "password"]), SPACE_ENV) == "password"


# -- the GPU plan (more in tests/test_fetch.py) ---------------------------------------------------


@pytest.mark.parametrize("card_gib", [22.0, 44.4, 79.1, 139.8])  # L4/A10G, L40S, H100, H200
def test_the_gpu_plan_fits_a_7b_server_its_kv_cache_and_trainer_on_one_card(card_gib):
    from tests.test_fetch import MISTRAL_7B

    shape = ModelShape.from_config(MISTRAL_7B)
    plan = plan_for(card_gib, shape)
    vllm_gib = plan.gpu_memory_utilization * card_gib
    kv_gib = vllm_gib - shape.weights_gib(plan.vllm_quantization == "bitsandbytes") - 1.5  # graphs, activations
    assert kv_gib >= 3.5, plan  # >= 8 pairs at the full 2,048-token context (128 KiB per token)
    assert vllm_gib + shape.trainer_gib(plan.trainer_quantize == "4bit") + 1.0 <= card_gib + 1e-6, plan


def test_a_card_too_small_for_a_7b_server_and_trainer_is_refused_with_the_way_out():
    from tests.test_fetch import MISTRAL_7B

    with pytest.raises(EngineError, match="--vllm-url"):
        plan_for(15.0, ModelShape.from_config(MISTRAL_7B))


# -- Sign in with Hugging Face -------------------------------------------------------------------


class _OpenIDStub(http.server.BaseHTTPRequestHandler):
    """Stands in for huggingface.co's OpenID provider, which cannot be reached from here: it only
    serves the discovery document that authlib reads before redirecting to the login page."""

    def do_GET(self):  # noqa: N802
        host = f"http://127.0.0.1:{self.server.server_port}"
        body = json.dumps({"issuer": host, "authorization_endpoint": f"{host}/oauth/authorize",
                           "token_endpoint": f"{host}/oauth/token", "userinfo_endpoint": f"{host}/oauth/userinfo",
                           "jwks_uri": f"{host}/oauth/jwks"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


SECRET = "space-oauth-secret"


def session_cookie(username: str, sub: str | None = None, orgs: tuple[str, ...] = ()) -> str:
    """The cookie Gradio's OAuth callback sets after a login (Starlette's signed session): what a
    browser sends once its user has signed in with Hugging Face."""
    from itsdangerous import TimestampSigner

    session = {"oauth_info": {"access_token": "hf_oauth_token", "scope": "openid profile", "expires_at": 4102444800,
                              "userinfo": {"sub": sub or f"sub-{username}", "preferred_username": username,
                                           "name": username.title(),
                                           "orgs": [{"sub": f"org-{o}", "preferred_username": o} for o in orgs]}}}
    data = base64.b64encode(json.dumps(session).encode())
    secret = hashlib.sha256((SECRET + "-v4").encode()).hexdigest()
    return TimestampSigner(secret).sign(data).decode()


@pytest.fixture(scope="module")
def provider():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenIDStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _space(engine, model_dir, folder: Path, provider: str, args: list[str]) -> RunningApp:
    """The app with the environment a Space with `hf_oauth: true` gets."""
    env = {"SYSTEM": "spaces", "SPACE_ID": "me/prefloop", "SPACE_AUTHOR_NAME": "me",
           "SPACE_HOST": "me-prefloop.hf.space",
           "OAUTH_CLIENT_ID": "prefloop-client", "OAUTH_CLIENT_SECRET": SECRET, "OAUTH_SCOPES": "openid profile",
           "OPENID_PROVIDER_URL": provider}
    return RunningApp(folder, engine, model_dir, ["--round-every-votes", "0", "--admins", "me", *args], env=env)


@pytest.fixture(scope="module")
def space_app(engine, smollm2_dir, tmp_path_factory, provider):
    app = _space(engine, smollm2_dir, tmp_path_factory.mktemp("space-data"), provider,
                 ["--annotators", "carol,dave,org:friends"])
    yield app
    app.stop()


def _as(app: RunningApp, user: str, **kw):
    from gradio_client import Client

    return Client(app.url, verbose=False, headers={"Cookie": f"session={session_cookie(user, **kw)}"})


def _admin_http(app: RunningApp, user: str, **kw) -> httpx.Client:
    c = httpx.Client(base_url=app.url, timeout=60)
    c.cookies.set("session", session_cookie(user, **kw))
    return c


def _admin_event(app: RunningApp, client: httpx.Client, name: str, data: list | None = None) -> dict:
    from tests.test_admin import _call

    config = client.get("config").json()
    index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == name)
    return [m for m in _call(client, index, data) if m.get("msg") in ("process_completed", "unexpected_error")][-1]


def test_on_a_space_the_app_signs_people_in_with_hugging_face(space_app):
    log = space_app.log.read_text()
    assert "sign in with Hugging Face" in log
    assert "Traceback" not in log, log  # gradio's Spaces hot-reload watcher must stay off (no `spaces` package)
    http_client = httpx.Client(base_url=space_app.url, timeout=30)
    assert "hf-login" in http_client.get("config").text  # the page is open; the login button is on it
    r = http_client.get("login/huggingface", follow_redirects=False)
    assert r.status_code in (302, 307), r.text
    target = r.headers["location"]
    assert "/oauth/authorize?" in target and "client_id=prefloop-client" in target
    # no password login here: the users file is not used
    assert http_client.post("login", data={"username": "alice", "password": "alice-pw"}).status_code != 200


def test_each_annotator_is_their_hugging_face_account_and_anonymous_calls_are_refused(space_app):
    from gradio_client import Client

    anonymous = Client(space_app.url, verbose=False)
    with pytest.raises(Exception, match="log in first"):
        anonymous.predict("", api_name="/next_pair")
    carol = Client(space_app.url, verbose=False, headers={"Cookie": f"session={session_cookie('carol')}"})
    pair = carol.predict("", api_name="/next_pair")
    vote = carol.predict(pair["pair_id"], "left", api_name="/vote")
    assert vote["choice"] == "left"
    dave = Client(space_app.url, verbose=False, headers={"Cookie": f"session={session_cookie('dave')}"})
    with pytest.raises(Exception, match="(?i)not issued to you|another annotator|not yours"):
        dave.predict(pair["pair_id"], "right", api_name="/vote")
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        rows = db.execute("SELECT annotator, choice FROM votes").fetchall()
    assert rows == [("hf:sub-carol", "left")]  # keyed by the account's stable id, not its name
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        assert ("hf:sub-carol", "carol") in db.execute("SELECT key, name FROM people").fetchall()


def test_the_space_owner_named_in_admins_is_admin_and_an_annotator_is_not(space_app):
    from tests.test_admin import ADMIN_EVENTS, _call

    def client(user: str) -> httpx.Client:
        c = httpx.Client(base_url=space_app.url, timeout=60)
        c.cookies.set("session", session_cookie(user))
        return c

    config = client("me").get("config").json()
    index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "admin_refresh")
    assert "admin_refresh" in ADMIN_EVENTS
    owner = [m for m in _call(client("me"), index) if m.get("msg") == "process_completed"]
    assert owner and owner[-1]["success"] and "Votes:" in json.dumps(owner[-1]["output"])
    carol = [m for m in _call(client("carol"), index) if m.get("msg") == "process_completed"]
    assert carol and not carol[-1]["success"]



def test_only_listed_people_and_members_of_listed_organisations_may_annotate(space_app):
    with pytest.raises(Exception, match="erin, who is not among this app's annotators"):
        _as(space_app, "erin").predict("", api_name="/next_pair")
    assert _as(space_app, "frank", orgs=("friends",)).predict("", api_name="/next_pair")["pair_id"]
    with pytest.raises(Exception, match="not among this app's annotators"):
        _as(space_app, "gina", orgs=("strangers",)).predict("", api_name="/next_pair")
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        annotators = {r[0] for r in db.execute("SELECT DISTINCT annotator FROM pairs")}
    assert "hf:sub-erin" not in annotators and "hf:sub-gina" not in annotators


def test_a_rename_keeps_a_persons_votes_together_and_does_not_pass_on_an_admin_name(space_app):
    pair = _as(space_app, "dave").predict("", api_name="/next_pair")
    # dave renames himself; his account (sub) is the same: his pair is still his to vote on
    vote = _as(space_app, "dave-renamed", sub="sub-dave").predict(pair["pair_id"], "right", api_name="/vote")
    assert vote["choice"] == "right"
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        voter = db.execute("SELECT annotator FROM votes WHERE pair_id = ?", (pair["pair_id"],)).fetchone()
        assert voter == ("hf:sub-dave",)
        assert db.execute("SELECT name FROM people WHERE key = 'hf:sub-dave'").fetchone() == ("dave-renamed",)
    assert _admin_event(space_app, _admin_http(space_app, "me"), "admin_refresh")["success"]  # binds "me"
    # another account that now carries the admin's name is not the admin
    impostor = _admin_event(space_app, _admin_http(space_app, "me", sub="sub-someone-else"), "admin_refresh")
    assert not impostor["success"]


def _refusal(app: RunningApp, headers: dict[str, str]) -> str:
    from gradio_client import Client

    with pytest.raises(Exception) as refused:
        Client(app.url, verbose=False, headers=headers).predict("", api_name="/next_pair")
    return str(refused.value)


def test_an_api_token_votes_as_its_name_until_revoked_and_never_reaches_the_admin_tab(space_app):
    """Where people sign in with Hugging Face there are no passwords: scripts and judges send a
    token an admin issued, bound to one name, stored hashed."""
    from gradio_client import Client

    me = _admin_http(space_app, "me")
    assert not _admin_event(space_app, _admin_http(space_app, "carol"), "admin_token_issue", ["robo"])["success"]
    issued = _admin_event(space_app, me, "admin_token_issue", ["robo"])
    assert issued["success"], issued
    token = re.search(r"pl_[A-Za-z0-9_-]{40,}", json.dumps(issued["output"]))[0]
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        stored = db.execute("SELECT name, digest FROM api_tokens").fetchall()
        assert stored == [("robo", hashlib.sha256(token.encode()).hexdigest())]  # the hash only
        assert token not in json.dumps(db.execute("SELECT * FROM settings").fetchall())
    assert "log in first" in _refusal(space_app, {"Authorization": f"Bearer {token}"})  # a private Space's header
    robo = Client(space_app.url, verbose=False, headers={"X-PrefLoop-Token": token})
    pair = robo.predict("", api_name="/next_pair")
    assert robo.predict(pair["pair_id"], "left", api_name="/vote")["choice"] == "left"
    with sqlite3.connect(space_app.data_dir / "votes.db") as db:
        assert db.execute("SELECT annotator FROM votes WHERE pair_id = ?", (pair["pair_id"],)).fetchone() == ("robo",)
    as_token = httpx.Client(base_url=space_app.url, timeout=60, headers={"X-PrefLoop-Token": token})
    assert not _admin_event(space_app, as_token, "admin_refresh")["success"]  # a token is never an admin...
    assert _admin_event(space_app, me, "admin_make_admin", ["robo"])["success"]
    assert not _admin_event(space_app, as_token, "admin_refresh")["success"]  # ...not even one bound to an admin's name
    assert _admin_event(space_app, me, "admin_remove_admin", ["robo"])["success"]
    assert "log in first" in _refusal(space_app, {"X-PrefLoop-Token": "pl_" + "x" * 43})  # a forged one
    assert _admin_event(space_app, me, "admin_token_revoke", ["robo"])["success"]
    with pytest.raises(Exception, match="log in first"):  # refused from the next request
        robo.predict("", api_name="/next_pair")


@pytest.fixture(scope="module")
def open_app(tiny_engine, tiny_mistral_dir, tmp_path_factory, provider):
    """On the tiny Mistral: its QLoRA round takes seconds, and who may vote, the cap and the manual
    promotion are what is checked here."""
    app = _space(tiny_engine, tiny_mistral_dir, tmp_path_factory.mktemp("open-space"), provider,
                 ["--annotators", "open", "--epochs", "1", "--quantize", "4bit"])  # QLoRA rounds, on the CPU
    yield app
    app.stop()


def _wait_round(app: RunningApp, timeout: float = 900) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(app.data_dir / "votes.db") as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
        if row is not None and row["status"] != "running":
            return dict(row)
        time.sleep(2)
    raise AssertionError("the round did not finish")


def _serving(app: RunningApp) -> str:
    with sqlite3.connect(app.data_dir / "votes.db") as db:
        row = db.execute("SELECT value FROM settings WHERE key = 'serving_adapter'").fetchone()
    return row[0] if row else "base"


def test_open_annotation_caps_each_person_and_a_qlora_round_waits_for_an_admin_to_promote(open_app):
    import time

    from storage.votes import VoteStore
    from tests.test_rounds import CHOSEN, REJECTED

    assert "Who may annotate: anyone signed in with Hugging Face; rounds are promoted by an admin" in \
        open_app.log.read_text()
    assert _as(open_app, "stranger").predict("", api_name="/next_pair")["pair_id"]  # open: anyone signed in
    store = VoteStore(open_app.data_dir / "votes.db")

    def votes(who: str, n: int, start: int) -> None:
        for i in range(start, start + n):
            text = f"Question {i}: give me advice."
            pid = store.issue_pair(annotator=who, prompt_id=store.prompt_id(text, source="test"),
                                   messages=[{"role": "user", "content": text}], answer_left=CHOSEN,
                                   answer_right=REJECTED, model_left="base", model_right="base", seed=i,
                                   params={}, timings={}, finish_reasons=("stop", "length"))
            store.record_vote(pid, who, "left")

    votes("hf:sub-zoe", 8, 0)  # one eager stranger
    me = _admin_http(open_app, "me")
    assert _admin_event(open_app, me, "admin_run_round")["success"]
    deadline = time.monotonic() + 60
    while "more people must vote" not in json.dumps(_admin_event(open_app, me, "admin_refresh")["output"]):
        assert time.monotonic() < deadline, "the round should have been refused for want of people"
        time.sleep(1)
    with sqlite3.connect(open_app.data_dir / "votes.db") as db:
        assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0  # nothing trained on one person

    for k, who in enumerate(("hf:sub-amy", "hf:sub-ben", "hf:sub-cal", "hf:sub-dan")):
        votes(who, 2, 100 + 2 * k)
    assert _admin_event(open_app, me, "admin_run_round")["success"]
    row = _wait_round(open_app)
    assert row["status"] == "awaiting", row
    manifest = json.loads((open_app.data_dir / "rounds" / f"{row['adapter']}.json").read_text())
    held_back = manifest["held_back_pairs"]
    assert manifest["config"]["train"]["quantize"] == "4bit" and manifest["metrics"]["base_precision"] == "4bit"
    assert _serving(open_app) == "base"  # not served before an admin says so
    stranger = _admin_event(open_app, _admin_http(open_app, "stranger"), "admin_promote")
    assert not stranger["success"] and _serving(open_app) == "base"
    assert _admin_event(open_app, me, "admin_promote")["success"]
    assert _serving(open_app) == row["adapter"]
    with sqlite3.connect(open_app.data_dir / "votes.db") as db:
        assert db.execute("SELECT status FROM rounds WHERE id = ?", (row["id"],)).fetchone() == ("promoted",)
        trained = db.execute("SELECT v.annotator, COUNT(*) FROM round_votes rv JOIN votes v ON v.id = rv.vote_id "
                             "WHERE rv.round_id = ? GROUP BY v.annotator", (row["id"],)).fetchall()
    trained = dict(trained)
    # zoe holds no more than 25% of what trained; the rest of her votes (less the held-out slice) wait
    assert 0 < trained["hf:sub-zoe"] <= 0.25 * sum(trained.values())
    assert held_back > 0 and trained["hf:sub-zoe"] + held_back <= 8
