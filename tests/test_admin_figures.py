"""The Admin tab's figures at scale: computed from every vote once, read back until the log
changes, and recomputed in the background where a full pass is slow, without a browser: a real
vote store, rounds, scheduler and access rules; the serving pointer is a stand-in (no vLLM is
needed to read which version is served).

    .venv/bin/python -m pytest tests/test_admin_figures.py
"""

import time
from types import SimpleNamespace

import pytest

from collector.users import Access
from storage.hub import HubSync
from storage.votes import VoteStore
from trainer.rounds import RoundConfig, Rounds
from trainer.schedule import ScheduleConfig, Scheduler
from ui import admin as admin_ui

ADMIN = SimpleNamespace(username="admin", session_hash="s", request=None, headers={}, client=None)


def _vote(store: VoteStore, who: str, i: int, choice: str = "left") -> int:
    pid = store.issue_pair(annotator=who, prompt_id=None, messages=[{"role": "user", "content": f"q{i}"}],
                           answer_left="a", answer_right="b", model_left="round-0001", model_right="base",
                           seed=i, params={}, timings={})
    return store.record_vote(pid, who, choice)


def make_admin(tmp_path) -> admin_ui.Admin:
    """The Admin tab's services over a real store with 6 votes of ann and ben."""
    store = VoteStore(tmp_path / "votes.db")
    for i in range(6):
        _vote(store, ("ann", "ben")[i % 2], i)
    rounds = Rounds(store, tmp_path, "base-model")
    scheduler = Scheduler(rounds, RoundConfig(), ScheduleConfig(min_new_votes=10), lambda names: None)
    return admin_ui.Admin(store=store, rounds=rounds, scheduler=scheduler, serving=SimpleNamespace(current="base"),
                          hub=HubSync(store, tmp_path / "hub", None, None),
                          access=Access("password", store, admins={"admin"}), exports=tmp_path / "exports")


@pytest.fixture
def admin(tmp_path):
    return make_admin(tmp_path)


def _passes(monkeypatch, store) -> list[int]:
    calls = []
    real = store.vote_facts
    monkeypatch.setattr(store, "vote_facts", lambda: calls.append(1) or real())
    return calls


def test_the_figures_are_read_back_until_a_vote_or_an_exclusion_changes_them(admin, monkeypatch):
    passes = _passes(monkeypatch, admin.store)
    first = admin_ui.view(admin, ADMIN)
    assert "6 in total" in first["summary"] and len(passes) == 1
    admin_ui.view(admin, ADMIN)
    assert len(passes) == 1  # nothing changed: no pass over the log
    _vote(admin.store, "ann", 99, "right")
    assert "7 in total" in admin_ui.view(admin, ADMIN)["summary"] and len(passes) == 2
    admin.store.set_excluded("ben", True, by="admin")
    assert "4 of them usable" in admin_ui.view(admin, ADMIN)["summary"] and len(passes) == 3
    assert admin.scheduler.usable_new_votes() == 4  # the scheduler's count follows the exclusion too


def test_a_slow_pass_runs_in_the_background_and_the_refresh_shows_the_last_figures(admin, monkeypatch):
    admin_ui.view(admin, ADMIN)
    monkeypatch.setattr(admin_ui, "INLINE_FIGURES_S", -1.0)  # every pass counts as slow
    release = []
    real = admin.store.vote_facts

    def slow():
        waited = time.monotonic() + 5  # an inline pass would hold the refresh this long, then fail below
        while not release and time.monotonic() < waited:
            time.sleep(0.01)
        return real()

    monkeypatch.setattr(admin.store, "vote_facts", slow)
    _vote(admin.store, "ann", 99, "right")
    stale = admin_ui.view(admin, ADMIN)  # answered at once, while the pass waits
    assert "6 in total" in stale["summary"] and "as of vote 6; updating" in stale["summary"]
    release.append(1)
    deadline = time.monotonic() + 10
    while "7 in total" not in admin_ui.view(admin, ADMIN)["summary"]:
        assert time.monotonic() < deadline, "the background pass should have finished"
        time.sleep(0.05)
    assert "updating" not in admin_ui.view(admin, ADMIN)["summary"]


def test_the_next_round_count_is_counted_again_only_when_the_log_changes(admin, monkeypatch):
    counts = []
    real = admin.store.count_votes
    monkeypatch.setattr(admin.store, "count_votes", lambda *a, **k: counts.append(1) or real(*a, **k))
    assert admin.scheduler.votes_to_next_round() == 4
    assert admin.scheduler.votes_to_next_round() == 4 and len(counts) == 1
    _vote(admin.store, "ben", 100)
    assert admin.scheduler.votes_to_next_round() == 3 and len(counts) == 2
