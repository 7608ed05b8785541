"""The Admin tab: admins only, checked on the server for every action.

    .venv/bin/python -m pytest tests/test_admin.py
"""

import json
import sqlite3
import uuid

import httpx
import pytest

ADMIN_EVENTS = ["admin_run_round", "admin_push", "admin_rollback", "admin_pause", "admin_tick", "admin_refresh",
                "admin_serve", "admin_exclude", "admin_include", "admin_export"]


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
