"""Safe in public: what strangers can send (logins, floods of requests) and what must survive a
fault, tested against the real app, SQLite and the Hub stand-in.

    .venv/bin/python -m pytest tests/test_public.py
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from storage.errors import StorageError
from storage.votes import VoteStore
from tests.conftest import ROOT, RunningApp

# -- logins ------------------------------------------------------------------------------------


def test_the_login_throttle_counts_names_and_addresses_in_a_window():
    from collector.users import LoginThrottle

    now = [0.0]
    t = LoginThrottle(per_name=3, per_address=5, window_s=60, clock=lambda: now[0])
    assert [t.attempt("alice", "1.1.1.1") for _ in range(3)] == [0, 0, 0]
    assert t.attempt("alice", "2.2.2.2") == pytest.approx(60)  # the name is throttled from any address
    assert t.attempt("bob", "1.1.1.1") == 0 and t.attempt("carol", "1.1.1.1") == 0
    assert t.attempt("dave", "1.1.1.1") == pytest.approx(60)  # five attempts from one address, any names
    now[0] = 30.0
    assert t.attempt("dave", "1.1.1.1") == pytest.approx(30)  # the wait counts down
    now[0] = 61.0
    assert t.attempt("alice", "3.3.3.3") == 0  # the window slid past the old attempts
    t.succeeded("alice", "3.3.3.3")
    assert all(t.attempt("alice", f"9.9.9.{i}") == 0 for i in range(3))  # a success clears the name


def test_the_login_throttle_remembers_a_bounded_number_of_names():
    from collector.users import LoginThrottle

    t = LoginThrottle(per_name=1, per_address=10**9, window_s=3600, max_keys=1000)
    for i in range(20_000):
        t.attempt(f"name-{i}", "1.1.1.1")
    assert len(t._seen) <= 1000


def test_an_unknown_name_costs_the_same_hash_as_a_known_one(monkeypatch):
    import asyncio

    import collector.users as users_module
    from collector.users import Users, hash_password

    users = Users({"alice": hash_password("right")})
    hashed: list[str] = []
    real = users_module.verify
    monkeypatch.setattr(users_module, "verify", lambda stored, pw: hashed.append(stored) or real(stored, pw))
    assert asyncio.run(users.check("alice", "wrong")) is False
    assert asyncio.run(users.check("nobody", "wrong")) is False
    assert asyncio.run(users.check("alice", "right")) is True
    assert len(hashed) == 3 and hashed[1].startswith("scrypt$")  # the unknown name was hashed too


def test_a_login_flood_is_refused_with_the_wait_and_a_logged_in_annotator_carries_on(app):
    bob = app.client("bob")
    pair = app.call(bob, "", api_name="/next_pair")
    codes: list[int] = []
    answers: list[httpx.Response] = []

    def guess(i: int) -> None:
        r = httpx.post(f"{app.url}login", data={"username": "mallory", "password": f"guess-{i}"}, timeout=60)
        codes.append(r.status_code)
        answers.append(r)

    flood = ThreadPoolExecutor(8)
    futures = [flood.submit(guess, i) for i in range(40)]
    voted = app.call(bob, pair["pair_id"], "left", api_name="/vote")  # during the flood
    for f in futures:
        f.result()
    assert voted["choice"] == "left"
    assert codes.count(400) <= 5 and codes.count(429) >= 35, codes  # 5 hashed guesses, the rest refused
    refused = next(r for r in answers if r.status_code == 429)
    assert int(refused.headers["retry-after"]) > 0 and "try again in" in refused.json()["detail"]
    assert app.client("alice") is not None  # other names still log in from this address


# -- load: votes never wait behind generation ---------------------------------------------------


@pytest.fixture(scope="module")
def narrow_app(engine, smollm2_dir, tmp_path_factory):
    """An app that generates one pair at a time and lets one more wait."""
    app = RunningApp(tmp_path_factory.mktemp("narrow"), engine, smollm2_dir,
                     ["--round-every-votes", "0", "--max-concurrent-pairs", "1", "--max-waiting-pairs", "1",
                      "--max-tokens", "256"])
    yield app
    app.stop()


def test_a_vote_is_answered_while_generation_is_full_and_a_third_pair_is_told_busy(narrow_app):
    from gradio_client.exceptions import AppError

    store = VoteStore(narrow_app.data_dir / "votes.db")
    held = store.issue_pair(annotator="bob", prompt_id=None, messages=[{"role": "user", "content": "hi"}],
                            answer_left="a", answer_right="b", model_left="base", model_right="base", seed=1,
                            params={}, timings={})
    done: list[str] = []
    errors: list[str] = []

    def ask(client) -> None:
        try:
            narrow_app.call(client, "Write a long story about a lighthouse keeper.", api_name="/next_pair")
            done.append("pair")
        except AppError as e:
            errors.append(str(e))

    asking = [narrow_app.client("alice"), narrow_app.client("alice")]
    bob = narrow_app.client("bob")
    clients = [threading.Thread(target=ask, args=(c,)) for c in asking]
    for c in clients:
        c.start()
        time.sleep(1.5)  # the first takes the slot, the second the one place in line
    with pytest.raises(AppError, match=r"busy: .* try again in \d+ s"):
        bob.predict("Another story, please.", api_name="/next_pair")
    vote = narrow_app.call(bob, held, "right", api_name="/vote")
    assert vote["choice"] == "right"
    assert done == [], "the vote must not have waited for a generation to finish"
    for c in clients:
        c.join(timeout=600)
    assert len(done) == 2 and errors == []  # the waiting one got its turn


# -- faults --------------------------------------------------------------------------------------


def _pair(store: VoteStore, who: str = "alice") -> str:
    return store.issue_pair(annotator=who, prompt_id=None, messages=[{"role": "user", "content": "q"}],
                            answer_left="a", answer_right="b", model_left="base", model_right="base", seed=1,
                            params={}, timings={})


def test_a_writer_that_dies_answers_its_waiting_votes_and_the_next_one_starts(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pairs = [_pair(store) for _ in range(6)]
    writer = store._writer
    first = writer._thread
    gate = threading.Event()

    def stall(conn):  # holds the writer so that the next writes queue up into one batch
        gate.wait(10)

    def die(conn):
        raise SystemExit("writer killed")  # not an Exception: escapes the per-write savepoint

    outcomes: dict[str, object] = {}

    def vote(pid: str) -> None:
        try:
            outcomes[pid] = store.record_vote(pid, "alice", "left")
        except StorageError as e:
            outcomes[pid] = e

    staller = threading.Thread(target=lambda: writer.submit(stall))
    staller.start()
    time.sleep(0.3)
    voters = [threading.Thread(target=vote, args=(p,)) for p in pairs[:3]]
    killer = threading.Thread(target=lambda: outcomes.setdefault("killer", _try(writer.submit, die)))
    for t in (voters[0], killer, voters[1], voters[2]):
        t.start()
        time.sleep(0.05)
    gate.set()
    for t in (*voters, killer, staller):
        t.join(timeout=60)
        assert not t.is_alive(), "a write waited forever"
    failed = [o for o in outcomes.values() if isinstance(o, StorageError)]
    assert failed and all("try again" in str(e) for e in failed)
    for p in pairs[:3]:  # a failed vote goes through when sent again; a recorded one keeps its id
        assert isinstance(store.record_vote(p, "alice", "left"), int)
    assert writer._thread is not first and writer.restarts >= 1  # a new writer took over
    assert store.count_votes() == 3


def _try(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001
        return e


def test_no_vote_waits_longer_than_the_writer_timeout(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    store._writer.timeout_s = 1.0
    pid = _pair(store)
    hold = threading.Event()
    blocker = threading.Thread(target=lambda: _try(store._writer.submit, lambda conn: hold.wait(30)))
    blocker.start()
    time.sleep(0.2)
    with pytest.raises(StorageError, match="did not answer within 1 s"):
        store.record_vote(pid, "alice", "left")
    hold.set()
    blocker.join()


def test_the_hub_sync_thread_survives_a_failed_staging_and_pushes_once_it_is_fixed(tmp_path):
    from huggingface_hub import HfApi

    from storage.hub import HubSync
    from tests.hubstub import HubStub

    stub = HubStub()
    store = VoteStore(tmp_path / "votes.db")
    store.record_vote(_pair(store), "alice", "left")
    hub = HubSync(store, tmp_path / "hub", "me/votes", HfApi(endpoint=stub.url, token="hf_x"), salt="s",
                  backoff_s=0.01)
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "staged").write_text("not a folder")  # staging cannot write its segment
    hub.start(every_s=0.2)
    deadline = time.monotonic() + 20
    while "staging failed" not in (hub.status.last_error or "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "staging failed" in hub.status.last_error
    assert "staging failed" in hub.refresh_status().line()  # what the Admin tab shows
    (tmp_path / "hub" / "staged").unlink()
    while not any(p.startswith("votes/") for p in stub.files("me/votes")) and time.monotonic() < deadline + 20:
        time.sleep(0.1)
    assert any(p.startswith("votes/") for p in stub.files("me/votes"))
    hub._stop.set()
    stub.close()


def _corrupt_a_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    for i in range(2 * page, 3 * page):  # the third page: a table's b-tree page
        data[i] = 0xA5
    path.write_bytes(bytes(data))


def test_a_damaged_vote_log_is_refused_at_start_with_the_file_and_what_to_do(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    for _ in range(50):
        store.record_vote(_pair(store), "alice", "left")
    with sqlite3.connect(tmp_path / "votes.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    copy = tmp_path / "copy" / "votes.db"
    copy.parent.mkdir()
    shutil.copy(tmp_path / "votes.db", copy)
    _corrupt_a_page(copy)
    with pytest.raises(StorageError, match=r"damaged.*\.recover"):
        VoteStore(copy, check=True)
    out = subprocess.run([sys.executable, "app.py", "--data-dir", str(copy.parent), "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert str(copy) in out.stderr and "damaged" in out.stderr and "Traceback" not in out.stderr
    VoteStore(tmp_path / "votes.db", check=True)  # the original is fine


def test_cleanup_leaves_a_running_round_alone_and_tidies_once_it_is_over(tmp_path, smollm2_dir):
    from filelock import FileLock

    from trainer.rounds import Rounds

    store = VoteStore(tmp_path / "votes.db")
    rounds = Rounds(store, tmp_path, str(smollm2_dir))
    round_id = rounds.log.start(0, pid=999_999_999)  # a pid that does not exist
    tmp = rounds.adapters / "round-0001.tmp-123"
    tmp.mkdir()
    holder = FileLock(str(tmp_path / "round.lock"))  # another process's round, as far as this one can tell
    holder.acquire()
    assert rounds.cleanup() is False
    assert tmp.exists() and rounds.log.get(round_id)["status"] == "running"
    holder.release()
    assert rounds.cleanup() is True
    assert not tmp.exists() and rounds.log.get(round_id)["status"] == "failed"


def test_a_left_behind_server_group_is_reaped_and_a_stranger_is_left_alone(tmp_path):
    from storage.procs import reap_pid_file, write_pid_file

    marker = "vllm.entrypoints.openai.api_server"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker],
                              start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        write_pid_file(tmp_path / "a.pid", orphan.pid, marker)
        assert reap_pid_file(tmp_path / "a.pid") == orphan.pid
        assert orphan.wait(timeout=20) is not None
        assert not (tmp_path / "a.pid").exists()
        write_pid_file(tmp_path / "b.pid", stranger.pid, marker)  # a reused pid: not a vLLM server
        assert reap_pid_file(tmp_path / "b.pid") is None
        assert stranger.poll() is None
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()


def test_logs_rotate_at_their_size_keeping_a_few(tmp_path):
    from collector.engine import rotate_log

    log = tmp_path / "vllm.log"
    for i in range(5):
        log.write_text(f"run {i}\n" * 100)
        rotate_log(log, max_bytes=100, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm.log.1", "vllm.log.2", "vllm.log.3"]
    assert (tmp_path / "vllm.log.1").read_text().startswith("run 4")


def test_the_command_line_export_hashes_people_with_the_apps_salt(tmp_path):
    from storage.__main__ import main as storage_main
    from storage.export import annotator_id

    store = VoteStore(tmp_path / "votes.db")
    store.record_vote(_pair(store, "alice"), "alice", "left")
    salt = store.annotator_salt()
    assert len(salt) >= 32 and store.annotator_salt() == salt  # made once, then kept
    assert storage_main(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    from datasets import load_dataset

    rows = load_dataset(str(tmp_path / "out"), "votes", split="train", cache_dir=str(tmp_path / "cache"))
    assert rows[0]["annotator"] == annotator_id("alice", salt) != annotator_id("alice", "")


def test_the_vote_log_and_a_generated_users_file_are_private_from_creation(tmp_path):
    from collector.users import Users

    before = os.umask(0o022)  # a permissive umask: the modes must not depend on it
    try:
        store = VoteStore(tmp_path / "votes.db")
        store.record_vote(_pair(store), "alice", "left")
        Users.generate(tmp_path / "users.txt")
    finally:
        os.umask(before)
    for name in ("votes.db", "votes.db-wal", "users.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


# -- hf mode: a real Space or nothing -------------------------------------------------------------


@pytest.mark.parametrize("drop", ["SYSTEM", "OAUTH_CLIENT_SECRET"])
def test_hf_mode_refuses_to_start_off_a_real_space_and_names_what_is_missing(tmp_path, drop):
    from tests.test_space import SPACE_ENV

    env = {**os.environ, **{k: v for k, v in SPACE_ENV.items() if k != drop}}
    env.pop(drop, None)
    out = subprocess.run([sys.executable, "app.py", "--auth", "hf", "--data-dir", str(tmp_path), "--admins", "me"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert drop in out.stderr and "--auth password" in out.stderr and "Traceback" not in out.stderr


def test_an_organisation_owned_space_must_name_its_admins():
    from huggingface_hub import HfApi

    from app import space_admins
    from collector.users import UsersError
    from tests.hubstub import HubStub

    stub = HubStub()
    stub.organisations.add("acme")
    api = HfApi(endpoint=stub.url, token="hf_x")
    with pytest.raises(UsersError, match="organisation 'acme'.*PREFLOOP_ADMINS"):
        space_admins(None, {"SPACE_AUTHOR_NAME": "acme"}, api)
    assert space_admins(None, {"SPACE_AUTHOR_NAME": "alice"}, api) == {"alice"}
    assert space_admins("bob, carol", {"SPACE_AUTHOR_NAME": "acme"}, api) == {"bob", "carol"}
    stub.close()


def test_sighup_stops_the_app_cleanly_like_sigterm(engine, smollm2_dir, tmp_path):
    import signal

    app = RunningApp(tmp_path / "data", engine, smollm2_dir, ["--round-every-votes", "0"])
    app.proc.send_signal(signal.SIGHUP)  # a closed terminal: by default it would kill the app mid-write
    assert app.proc.wait(timeout=60) == 0
    assert "shutting down" in app.log.read_text()
