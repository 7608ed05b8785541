"""The vote log: migrations, idempotent votes, clear refusals.

    .venv/bin/python -m pytest tests/test_storage.py
"""

import sqlite3

import pytest

from storage.db import MIGRATIONS, connect
from storage.errors import VoteRejected
from storage.votes import Choice, VoteStore


def _pair(store: VoteStore, annotator: str = "alice") -> str:
    pid = store.prompt_id("What is 2 + 2?")
    return store.issue_pair(
        annotator=annotator, prompt_id=pid, messages=[{"role": "user", "content": "What is 2 + 2?"}],
        answer_left="4", answer_right="Four.", model_left="base", model_right="base", seed=7,
        params={"temperature": 0.9}, timings={"ttft_s": [0.1, 0.1]},
    )


def test_database_is_wal_with_full_sync_and_migrated(tmp_path):
    VoteStore(tmp_path / "votes.db")
    conn = connect(tmp_path / "votes.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"prompts", "pairs", "votes", "rounds", "settings"} <= tables


def test_reopening_runs_no_migration_twice(tmp_path):
    VoteStore(tmp_path / "votes.db")
    store = VoteStore(tmp_path / "votes.db")  # would fail on CREATE TABLE if re-run
    assert store.count_votes() == 0


def test_record_vote_is_idempotent_on_the_pair_token(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pid = _pair(store)
    first = store.record_vote(pid, "alice", Choice.LEFT)
    again = store.record_vote(pid, "alice", "left")
    assert first == again
    assert store.count_votes() == 1


def test_vote_refusals_name_the_reason(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pid = _pair(store)
    with pytest.raises(VoteRejected, match="unknown pair"):
        store.record_vote("no-such-token", "alice", "left")
    with pytest.raises(VoteRejected, match="another annotator"):
        store.record_vote(pid, "bob", "left")
    with pytest.raises(VoteRejected, match="invalid choice 'maybe'"):
        store.record_vote(pid, "alice", "maybe")
    store.record_vote(pid, "alice", "tie")
    assert store.count_votes() == 1


def test_a_changed_vote_supersedes_the_old_one_which_is_kept(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pid = _pair(store)
    first = store.record_vote(pid, "alice", "tie")
    second = store.record_vote(pid, "alice", "right")
    assert second > first  # a new vote: the next round sees it as new
    assert store.record_vote(pid, "alice", "right") == second  # the same choice again: the same vote
    assert store.vote_history(pid) == [(first, "tie", second), (second, "right", None)]
    assert store.count_votes() == 1 and store.counts_by_choice() == {"right": 1}  # the latest counts
    assert [v["choice"] for v in store.votes_with_pairs()] == ["right"]
    assert [v["vote_id"] for v in store.votes_with_pairs(superseded=True)] == [first, second]
    third = store.record_vote(pid, "alice", "tie")  # and back: a third row
    assert store.current_choice(pid) == "tie" and len(store.vote_history(pid)) == 3 and third > second


def test_a_vote_a_round_has_taken_can_no_longer_change(tmp_path):
    from storage.rounds import RoundLog

    store = VoteStore(tmp_path / "votes.db")
    pid, later = _pair(store), _pair(store)
    vote = store.record_vote(pid, "alice", "left")
    RoundLog(store).start(watermark=store.max_vote_id(), pid=0)  # a round snapshots votes up to here
    with pytest.raises(VoteRejected, match="taken by round 1 already"):
        store.record_vote(pid, "alice", "right")
    assert store.vote_history(pid) == [(vote, "left", None)]
    newer = store.record_vote(later, "alice", "left")  # cast after the snapshot: still free to change
    assert store.record_vote(later, "alice", "tie") > newer


def test_the_migration_keeps_every_vote_and_one_current_vote_per_pair(tmp_path):
    from storage.db import MIGRATIONS

    old = connect(tmp_path / "votes.db")  # a vote log as the previous schema left it
    old.execute("BEGIN")
    for n, fn in enumerate(MIGRATIONS[:8], start=1):
        fn(old)
        old.execute(f"PRAGMA user_version={n}")
    old.execute("INSERT INTO pairs(id, annotator, messages, answer_left, answer_right, model_left, model_right, "
                "seed, params, timings, created_at) VALUES ('p1', 'alice', '[]', 'a', 'b', 'base', 'base', 1, "
                "'{}', '{}', 0)")
    old.execute("INSERT INTO votes(pair_id, annotator, choice, created_at, reason) VALUES ('p1', 'alice', 'left', 0, "
                "'why')")
    old.execute("INSERT INTO rounds(status, watermark, started_at) VALUES ('promoted', 1, 0)")
    old.execute("INSERT INTO round_votes(round_id, vote_id) VALUES (1, 1)")
    old.execute("COMMIT")
    old.close()
    store = VoteStore(tmp_path / "votes.db")  # migrates
    assert store.vote_history("p1") == [(1, "left", None)] and store.vote_notes(1) == ("why", None)
    assert store.count_votes() == 1
    with pytest.raises(VoteRejected, match="taken by round 1"):
        store.record_vote("p1", "alice", "right")
    pid = _pair(store)
    store.record_vote(pid, "alice", "left")
    conn = connect(tmp_path / "votes.db")
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    with pytest.raises(sqlite3.IntegrityError):  # the schema itself allows one current vote per pair
        conn.execute("INSERT INTO votes(pair_id, annotator, choice, created_at) VALUES (?, 'alice', 'tie', 0)",
                     (pid,))


def test_schema_refuses_an_invalid_choice_even_without_the_api(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pid = _pair(store)
    conn = connect(tmp_path / "votes.db")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO votes(pair_id, annotator, choice, created_at) VALUES (?, 'alice', 'meh', 0)", (pid,))


def test_finish_reasons_are_kept_with_the_pair_and_a_swapped_repeat_swaps_them(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    pid = store.issue_pair(
        annotator="alice", prompt_id=None, messages=[{"role": "user", "content": "q"}], answer_left="cut",
        answer_right="done.", model_left="base", model_right="base", seed=1, params={}, timings={},
        finish_reasons=("length", "stop"))
    assert store.get_pair(pid).finish_reasons == ("length", "stop")
    store.record_vote(pid, "alice", "right")
    row = store.votes_with_pairs()[0]
    assert (row["finish_left"], row["finish_right"]) == ("length", "stop")
    repeat = store.issue_repeat(pid, "bob", swap=True)
    assert store.get_pair(repeat).finish_reasons == ("stop", "length")
    unknown = _pair(store)  # a caller that does not say: NULL, read back as unknown
    assert store.get_pair(unknown).finish_reasons == ("", "")


def test_a_database_from_before_finish_reasons_migrates_with_them_unknown(tmp_path):
    path = tmp_path / "votes.db"
    conn = sqlite3.connect(path)
    for migrate in MIGRATIONS[:4]:
        migrate(conn)
    conn.execute("""INSERT INTO pairs(id, annotator, messages, answer_left, answer_right, model_left,
                    model_right, seed, params, timings, created_at) VALUES ('old', 'a', '[]', 'L', 'R',
                    'base', 'base', 1, '{}', '{}', 0)""")
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    store = VoteStore(path)
    assert store.get_pair("old").finish_reasons == ("", "")
    store.record_vote("old", "a", "left")
    assert store.votes_with_pairs()[0]["finish_left"] is None


def test_a_database_from_before_private_prompts_keeps_typed_prompts_with_their_author(tmp_path):
    # Migration 6: typed prompts become their first asker's; votes up to the newest promoted
    # round's watermark count as trained by it (earlier rounds trained on every vote up to theirs).
    path = tmp_path / "votes.db"
    conn = sqlite3.connect(path)
    for migrate in MIGRATIONS[:5]:
        migrate(conn)
    conn.execute("INSERT INTO prompts(id, text, source, created_at) VALUES (1, 'bundled', 'prompts.txt', 0)")
    conn.execute("INSERT INTO prompts(id, text, source, created_at) VALUES (2, 'my secret', 'annotator', 0)")
    for i, (prompt, who) in enumerate([(2, "carol"), (2, "dave"), (1, "dave")], 1):
        conn.execute(f"""INSERT INTO pairs(id, annotator, prompt_id, messages, answer_left, answer_right,
                        model_left, model_right, seed, params, timings, created_at) VALUES ('p{i}', '{who}', {prompt},
                        '[]', 'L', 'R', 'base', 'base', 1, '{{}}', '{{}}', {i})""")
        conn.execute(f"INSERT INTO votes(id, pair_id, annotator, choice, created_at) VALUES ({i}, 'p{i}', '{who}', "
                     f"'left', {i})")
    conn.execute("INSERT INTO rounds(id, status, watermark, adapter, started_at) "
                 "VALUES (1, 'promoted', 2, 'round-0001', 0)")
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    store = VoteStore(path)
    assert [p["owner"] for p in store.private_prompts()] == ["carol"]
    assert [r["id"] for r in store.prompt_stats()] == [1]  # the queue sees the shared pool only
    from storage.rounds import RoundLog

    assert RoundLog(store).consumed_votes() == {1, 2}


def test_typed_prompts_are_never_served_or_repeated_to_anyone_else_until_shared(tmp_path):
    from collector.prompts import PromptQueue

    store = VoteStore(tmp_path / "votes.db")
    queue = PromptQueue(store)
    store.add_prompts(["a shared one"], source="test")
    secret = store.prompt_id("carol's private question", owner="carol")
    pid = store.issue_pair(annotator="carol", prompt_id=secret, messages=[{"role": "user", "content": "x"}],
                           answer_left="L", answer_right="R", model_left="base", model_right="base", seed=1,
                           params={}, timings={})
    store.record_vote(pid, "carol", "left")
    seen = {queue.next_for(f"person{i}")[1][-1]["content"] for i in range(20)}
    assert seen == {"a shared one"}  # never carol's
    assert store.repeat_candidate("dave") is None  # her voted pair is not shown again to others
    assert store.repeat_candidate("carol") == pid  # but may be to her
    assert store.share_prompt(secret, by="alice")
    assert "carol's private question" in {r["text"] for r in store.prompt_stats()}  # in the queue's pool now
    assert store.repeat_candidate("dave") == pid
