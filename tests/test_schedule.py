"""When rounds start by themselves.

    .venv/bin/python -m pytest tests/test_schedule.py
"""


from storage.rounds import RoundLog
from storage.votes import VoteStore
from tests.test_rounds import _seed_votes
from trainer.rounds import RoundConfig, Rounds
from trainer.schedule import ScheduleConfig, Scheduler


def _scheduler(tmp_path, **kw) -> tuple[VoteStore, Scheduler]:
    store = VoteStore(tmp_path / "votes.db")
    rounds = Rounds(store, tmp_path, "unused-model")
    return store, Scheduler(rounds, RoundConfig(), ScheduleConfig(**kw), lambda names: None)


def _finished_round(store: VoteStore, status: str, watermark: int) -> None:
    log = RoundLog(store)
    log.finish(log.start(watermark, pid=0), status, "made by the test", adapter=None)


def test_a_round_is_due_after_enough_new_usable_votes(tmp_path):
    store, sched = _scheduler(tmp_path, min_new_votes=8)
    _seed_votes(store, 7)
    assert sched.due() is None and sched.votes_to_next_round() == 1
    _seed_votes(store, 1)
    assert "8 new votes" in sched.due() and sched.votes_to_next_round() == 0
    sched.paused = True
    assert sched.due() is None and sched.next_trigger() == "paused" and sched.votes_to_next_round() is None


def test_a_rejected_round_does_not_trigger_again_on_the_same_votes(tmp_path):
    # The trigger counts from the newest finished round, whatever its verdict.
    store, sched = _scheduler(tmp_path, min_new_votes=8)
    _seed_votes(store, 8)
    _finished_round(store, "rejected", watermark=8)
    assert sched.due() is None
    assert sched.next_trigger() == "0/8 new votes"
    _seed_votes(store, 8)
    assert sched.due() is not None
