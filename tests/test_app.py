"""The real app (`python app.py`) driven by scripts and by a browser.

    .venv/bin/python -m pytest tests/test_app.py
"""

import sqlite3
import subprocess
import sys

import pytest

from storage.votes import Choice
from tests.conftest import ROOT


def test_next_pair_and_vote_through_gradio_client_land_in_sqlite(app):
    client = app.client("alice")
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    choice = next(p for p in api["/vote"]["parameters"] if p["parameter_name"] == "choice")
    assert set(choice["type"].get("enum", [])) == {c.value for c in Choice}  # listed on the API page
    assert [p["parameter_has_default"] for p in api["/next_pair"]["parameters"]] == [True]
    pair = client.predict(api_name="/next_pair")  # the prompt is optional: the queue's next
    assert set(pair) >= {"pair_id", "prompt", "left", "right", "cut_left", "cut_right"}
    assert pair["left"] != pair["right"]
    out = client.predict(pair["pair_id"], "right", "clearer", api_name="/vote")
    assert out["choice"] == "right"
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        row = conn.execute(
            "SELECT v.annotator, v.choice, p.answer_left, p.answer_right, p.finish_left, p.finish_right, "
            "v.reason, v.guideline FROM votes v JOIN pairs p ON p.id = v.pair_id WHERE v.id = ?",
            (out["vote_id"],)).fetchone()
        versions = [r[0] for r in conn.execute("SELECT version FROM guidelines")]
    assert row[:4] == ("alice", "right", pair["left"], pair["right"])
    assert row[6] == "clearer" and versions == [row[7]]  # the reason, and the guidelines it was cast under
    # cut_*: that answer stopped at the token limit (vLLM's finish reason), as stored with the pair
    assert (pair["cut_left"], pair["cut_right"]) == (row[4] == "length", row[5] == "length")
    assert row[4] in ("stop", "length") and row[5] in ("stop", "length")


def test_a_typed_prompt_is_answered_and_a_replayed_vote_adds_nothing(app):
    client = app.client("bob")
    pair = client.predict("What is the capital of France?", api_name="/next_pair")
    assert pair["prompt"] == "What is the capital of France?"
    first = client.predict(pair["pair_id"], "tie", api_name="/vote")
    again = client.predict(pair["pair_id"], "tie", api_name="/vote")
    assert first["vote_id"] == again["vote_id"]


def test_someone_elses_pair_and_a_bad_choice_are_refused(app):
    from gradio_client.exceptions import AppError

    pair = app.client("alice").predict("", api_name="/next_pair")
    with pytest.raises(AppError, match="another annotator"):
        app.client("bob").predict(pair["pair_id"], "left", api_name="/vote")
    with pytest.raises(AppError, match="invalid choice"):
        app.client("alice").predict(pair["pair_id"], "sideways", api_name="/vote")


def test_api_without_login_is_refused(app):
    import httpx
    from gradio_client import Client

    with pytest.raises(Exception, match="login|credentials"):
        Client(app.url, verbose=False).predict("", api_name="/next_pair")
    r = httpx.post(f"{app.url}gradio_api/call/vote", json={"data": ["x", "left"]}, timeout=10)
    assert r.status_code in (401, 403)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_flag():
    out = _cli("--help").stdout
    for flag in ("--model", "--data-dir", "--host", "--port", "--vllm-url", "--users", "--admins"):
        assert flag in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--users", "/nonexistent/users.txt"], "users file /nonexistent/users.txt not found"),
        (["--model", "/nonexistent/model"], "no config.json"),
        (["--model", "no-such-org/no-such-model"], "--model no-such-org/no-such-model"),
    ],
)
def test_bad_input_gets_one_clear_line_not_a_traceback(tmp_path, args, message):
    users = tmp_path / "u.txt"
    users.write_text("a:b\n")
    base = ["--data-dir", str(tmp_path), "--port", "0"]
    if "--users" not in args:
        base += ["--users", str(users)]
    r = _cli(*base, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_a_port_in_use_is_reported(app, tmp_path):
    users = tmp_path / "u.txt"
    users.write_text("a:b\n")
    r = _cli("--data-dir", str(tmp_path), "--users", str(users), "--port", str(app.port))
    assert r.returncode == 2
    assert f"port {app.port}" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr
