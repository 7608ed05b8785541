"""The Admin tab: admins only, checked on the server for every action. Each action's test looks at
its effect (no round started, nothing staged, serving unchanged, ...), not only at the error a
non-admin gets, so that it fails if that action's own role check is removed.

    .venv/bin/python -m pytest tests/test_admin.py
"""

import json
import sqlite3
import uuid

import httpx
import pytest

from storage.votes import VoteStore

ADMIN_EVENTS = ["admin_run_round", "admin_push", "admin_rollback", "admin_pause", "admin_tick", "admin_refresh",
                "admin_serve", "admin_exclude", "admin_include", "admin_export", "admin_promote", "admin_reject",
                "admin_share_prompt", "admin_publish", "admin_judge_mark", "admin_judge_unmark", "admin_judge_include",
                "admin_judge_exclude", "admin_judge_bootstrap", "admin_token_issue", "admin_token_revoke"]


def _session(app, user: str) -> httpx.Client:
    client = httpx.Client(base_url=app.url, timeout=60, follow_redirects=True)
    r = client.post("login", data={"username": user, "password": app.users[user]})
    assert r.status_code == 200, r.text
    return client


def _call(client: httpx.Client, fn_index: int, data: list | None = None) -> list[dict]:
    """Call one event through Gradio's queue over raw HTTP; returns the server's messages."""
    session = uuid.uuid4().hex
    r = client.post("gradio_api/queue/join", json={"data": data or [], "fn_index": fn_index, "session_hash": session,
                                                   "event_data": None, "trigger_id": None})
    if r.status_code != 200:
        return [{"msg": "refused", "status": r.status_code, "body": r.text}]
    messages = []
    with client.stream("GET", f"gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                messages.append(msg)
                if msg.get("msg") in ("process_completed", "close_stream", "unexpected_error"):
                    break
    return messages


@pytest.fixture(scope="module")
def admin_fns(app) -> dict[str, tuple[int, int]]:
    """api name -> (fn_index, number of inputs)."""
    config = _session(app, "alice").get("config").json()
    fns = {d.get("api_name"): (i, len(d["inputs"])) for i, d in enumerate(config["dependencies"])
           if d.get("api_name") in ADMIN_EVENTS}
    assert sorted(fns) == sorted(ADMIN_EVENTS)
    return fns


def test_a_non_admin_gets_nothing_from_any_admin_event_over_raw_http(app, admin_fns):
    bob = _session(app, "bob")
    for name, (index, n_inputs) in admin_fns.items():
        # well-formed inputs (bob names himself), so a refusal can only come from the role check
        messages = _call(bob, index, ["bob"] * n_inputs)
        done = [m for m in messages if m.get("msg") in ("process_completed", "refused", "unexpected_error")]
        assert done, (name, messages)
        last = done[-1]
        assert last.get("msg") == "refused" or not last.get("success", False), (name, last)
        assert "Votes:" not in json.dumps(messages)  # no admin figures leaked
    with sqlite3.connect(app.data_dir / "votes.db") as db:
        assert db.execute("SELECT COUNT(*) FROM excluded_annotators").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM judges").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM api_tokens").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM settings WHERE key = 'judge_bootstrap_votes'").fetchone()[0] == 0
    anonymous = httpx.Client(base_url=app.url, timeout=30)
    assert anonymous.post("gradio_api/queue/join", json={"data": [], "fn_index": admin_fns["admin_refresh"][0],
                                                         "session_hash": "x"}).status_code in (401, 403)


def test_an_admin_gets_the_figures(app, admin_fns):
    messages = _call(_session(app, "alice"), admin_fns["admin_refresh"][0])
    done = [m for m in messages if m.get("msg") == "process_completed"]
    assert done and done[-1]["success"], messages
    assert "Votes:" in json.dumps(done[-1]["output"])


def test_an_admin_exports_the_dataset_as_a_zip_with_both_configs(app, admin_fns):
    import zipfile
    from pathlib import Path

    from storage.votes import VoteStore
    from tests.test_rounds import _seed_votes

    _seed_votes(VoteStore(app.data_dir / "votes.db"), 2)
    messages = _call(_session(app, "alice"), admin_fns["admin_export"][0])
    done = [m for m in messages if m.get("msg") == "process_completed"]
    assert done and done[-1]["success"], messages
    path = Path(done[-1]["output"]["data"][0]["value"]["path"])
    names = zipfile.ZipFile(path).namelist()
    assert "README.md" in names
    assert any(n.startswith("votes/") for n in names) and any(n.startswith("preferences/") for n in names)
    again = [m for m in _call(_session(app, "alice"), admin_fns["admin_export"][0])
             if m.get("msg") == "process_completed"]
    assert again and again[-1]["success"]
    assert len(list((app.data_dir / "exports").rglob("*.zip"))) == 1  # only the newest export is kept


# -- each action, by its effect ---------------------------------------------------------------


def _done(messages: list[dict]) -> dict:
    return [m for m in messages if m.get("msg") in ("process_completed", "unexpected_error")][-1]


def _db(app, query: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(app.data_dir / "votes.db") as db:
        return db.execute(query, args).fetchall()


def _serving(app) -> str:
    from storage.serving import ServingLog

    return ServingLog(VoteStore(app.data_dir / "votes.db")).current()


def _by(app, admin_fns, user: str, event: str, *inputs) -> dict:
    return _done(_call(_session(app, user), admin_fns[event][0], list(inputs)))


def _seeded(app) -> None:
    from tests.test_rounds import _seed_votes

    if _db(app, "SELECT COUNT(*) FROM votes")[0][0] < 8:
        _seed_votes(VoteStore(app.data_dir / "votes.db"), 8)


def test_a_non_admin_cannot_start_a_round(app, admin_fns):
    import time

    _seeded(app)  # enough votes: only the role check stands between bob and a round
    before = _db(app, "SELECT COUNT(*) FROM rounds")
    assert not _by(app, admin_fns, "bob", "admin_run_round").get("success")
    time.sleep(3)
    assert _db(app, "SELECT COUNT(*) FROM rounds") == before
    view = json.dumps(_by(app, admin_fns, "alice", "admin_refresh")["output"])
    assert "Round (started by" not in view


def test_a_non_admin_cannot_push_or_stage_the_dataset(app, admin_fns):
    _seeded(app)
    before = sorted((app.data_dir / "hub").rglob("*.parquet"))
    assert not _by(app, admin_fns, "bob", "admin_push").get("success")
    assert sorted((app.data_dir / "hub").rglob("*.parquet")) == before


def test_a_non_admin_cannot_export_the_dataset(app, admin_fns):
    _seeded(app)
    before = sorted((app.data_dir / "exports").rglob("*"))
    assert not _by(app, admin_fns, "bob", "admin_export").get("success")
    assert sorted((app.data_dir / "exports").rglob("*")) == before


def test_a_non_admin_cannot_pause_or_resume_the_schedule(app, admin_fns):
    def paused() -> bool:
        view = json.dumps(_by(app, admin_fns, "alice", "admin_refresh")["output"])
        assert "Next round:**" in view
        return "Next round:** paused" in view

    before = paused()
    assert not _by(app, admin_fns, "bob", "admin_pause").get("success")
    assert paused() == before
    assert _by(app, admin_fns, "alice", "admin_pause")["success"]
    assert paused() != before
    assert not _by(app, admin_fns, "bob", "admin_pause").get("success")
    assert paused() != before
    assert _by(app, admin_fns, "alice", "admin_pause")["success"]  # as it was, for the other tests


def test_a_non_admin_cannot_exclude_or_include_anyone(app, admin_fns):
    assert not _by(app, admin_fns, "bob", "admin_exclude", "carol").get("success")
    assert _db(app, "SELECT annotator FROM excluded_annotators") == []
    assert _by(app, admin_fns, "alice", "admin_exclude", "carol")["success"]
    assert not _by(app, admin_fns, "bob", "admin_include", "carol").get("success")
    assert _db(app, "SELECT annotator FROM excluded_annotators") == [("carol",)]
    assert _by(app, admin_fns, "alice", "admin_include", "carol")["success"]
    assert _db(app, "SELECT annotator FROM excluded_annotators") == []


def test_a_non_admin_cannot_share_someone_elses_typed_prompt(app, admin_fns):
    pid = VoteStore(app.data_dir / "votes.db").prompt_id("bob's private question", owner="bob")
    assert not _by(app, admin_fns, "bob", "admin_share_prompt", str(pid)).get("success")
    assert _db(app, "SELECT owner FROM prompts WHERE id = ?", (pid,)) == [("bob",)]
    assert _by(app, admin_fns, "alice", "admin_share_prompt", str(pid))["success"]
    assert _db(app, "SELECT owner FROM prompts WHERE id = ?", (pid,)) == [(None,)]


def _round_row(app, round_id: int, status: str, adapter: str) -> None:
    """A round's row and manifest, as a round leaves them (the adapter folder is the caller's)."""
    import time

    (app.data_dir / "rounds" / f"{adapter}.json").write_text(json.dumps(
        {"round": round_id, "adapter": adapter, "watermark": 0, "base_model": "test", "metrics": {}}))

    with sqlite3.connect(app.data_dir / "votes.db") as db:
        db.execute("INSERT INTO rounds(id, status, watermark, adapter, reason, started_at, finished_at) "
                   "VALUES (?, ?, 0, ?, 'made by the test', ?, ?)",
                   (round_id, status, adapter, time.time(), time.time()))


def test_a_non_admin_cannot_promote_or_reject_a_waiting_round(app, admin_fns, smollm2_dir):
    from tests.conftest import make_adapter

    make_adapter(smollm2_dir, app.data_dir / "adapters" / "round-0950")
    _round_row(app, 950, "awaiting", "round-0950")
    for event in ("admin_promote", "admin_reject"):
        assert not _by(app, admin_fns, "bob", event).get("success")
        assert _db(app, "SELECT status FROM rounds WHERE id = 950") == [("awaiting",)]
    assert _serving(app) != "round-0950" and (app.data_dir / "adapters" / "round-0950").exists()
    assert _by(app, admin_fns, "alice", "admin_reject")["success"]
    assert _db(app, "SELECT status FROM rounds WHERE id = 950") == [("rejected",)]


def test_a_non_admin_cannot_change_or_roll_back_what_is_served(app, admin_fns, smollm2_dir):
    import time

    from tests.conftest import make_adapter

    for n, seed in ((901, 1), (902, 2)):
        make_adapter(smollm2_dir, app.data_dir / "adapters" / f"round-0{n}", seed=seed)
        _round_row(app, n, "promoted", f"round-0{n}")
    deadline = time.monotonic() + 60
    while _serving(app) != "round-0902" and time.monotonic() < deadline:
        time.sleep(0.5)  # the schedule hands the newest promoted round to serving
    assert _serving(app) == "round-0902"
    try:
        assert not _by(app, admin_fns, "bob", "admin_rollback").get("success")
        assert _serving(app) == "round-0902"
        assert not _by(app, admin_fns, "bob", "admin_serve", "round-0901").get("success")
        assert _serving(app) == "round-0902"
        assert _by(app, admin_fns, "alice", "admin_serve", "round-0901")["success"]
        assert _serving(app) == "round-0901"
    finally:  # back to the base for the tests that share this app
        while _serving(app) != "base":
            assert _by(app, admin_fns, "alice", "admin_rollback")["success"]


def test_a_non_admin_cannot_publish_a_round(app, admin_fns, smollm2_dir, hub_stub):
    from storage.serving import ServingLog
    from tests.conftest import APP_ADAPTERS, make_adapter

    make_adapter(smollm2_dir, app.data_dir / "adapters" / "round-0960")
    # Not a version the other tests should be served: marked rolled back, the schedule never serves
    # it (it may still publish it: publishing is what this test is about).
    ServingLog(VoteStore(app.data_dir / "votes.db")).mark_rolled_back("round-0960")
    with sqlite3.connect(app.data_dir / "votes.db") as db:  # published already: the schedule leaves it alone
        db.execute("UPDATE rounds SET published_revision = 'x' WHERE status = 'promoted'")
    _round_row(app, 960, "awaiting", "round-0960")
    with sqlite3.connect(app.data_dir / "votes.db") as db:
        db.execute("UPDATE rounds SET status = 'promoted', published_revision = NULL WHERE id = 960")
    try:
        assert not _by(app, admin_fns, "bob", "admin_publish").get("success")
        assert "round-0960" not in hub_stub.tags.get(APP_ADAPTERS, {})
        assert _by(app, admin_fns, "alice", "admin_publish")["success"]
        assert "round-0960" in hub_stub.tags[APP_ADAPTERS]
    finally:
        with sqlite3.connect(app.data_dir / "votes.db") as db:
            db.execute("UPDATE rounds SET status = 'rejected' WHERE id = 960")
    assert _serving(app) != "round-0960"
