"""Pairs shown again (agreement, Cohen's kappa), excluding a person from training, and the admin's
figures, on real SQLite.

    .venv/bin/python -m pytest tests/test_agreement.py
"""

import random

import pytest

from collector.annotate import AnnotateConfig, Annotation
from collector.prompts import PromptQueue
from collector.quality import annotator_quality, cohen_kappa, repeat_judgements
from storage.pairs import build_pairs
from storage.votes import VoteStore
from ui import figures


def _voted_pair(store: VoteStore, annotator: str, choice: str, i: int = 0) -> str:
    text = f"Question {i}?"
    pid = store.issue_pair(
        annotator=annotator, prompt_id=store.prompt_id(text), messages=[{"role": "user", "content": text}],
        answer_left=f"left answer {i}", answer_right=f"right answer {i}", model_left="base", model_right="base",
        seed=i, params={}, timings={})
    store.record_vote(pid, annotator, choice)
    return pid


def test_cohen_kappa_matches_a_hand_checked_example():
    # 10 items, two raters. Observed agreement 7/10. Marginals: rater 1 left 5, right 3, tie 2;
    # rater 2 left 4, right 4, tie 2 -> chance = (5*4 + 3*4 + 2*2) / 100 = 0.36;
    # kappa = (0.7 - 0.36) / (1 - 0.36) = 0.53125.
    pairs = ([("left", "left")] * 4 + [("left", "right")] + [("right", "right")] * 2 + [("right", "tie")]
             + [("tie", "tie")] + [("tie", "right")])
    assert cohen_kappa(pairs) == pytest.approx(0.53125)
    assert cohen_kappa([("left", "left"), ("right", "right")]) == pytest.approx(1.0)
    assert cohen_kappa([]) is None


def test_a_repeat_shows_the_same_answers_and_agreement_maps_swapped_sides_back(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    original = _voted_pair(store, "alice", "left")
    assert store.repeat_candidate("bob") == original
    swapped = store.issue_repeat(original, "bob", swap=True)
    pair = store.get_pair(swapped)
    assert (pair.answer_left, pair.answer_right) == ("right answer 0", "left answer 0")
    assert pair.repeat_of == original and pair.repeat_swapped
    store.record_vote(swapped, "bob", "right")  # the same answer as alice's "left", shown on the right
    same = store.issue_repeat(original, "alice", swap=False)
    store.record_vote(same, "alice", "tie")  # alice disagrees with herself
    assert store.repeat_candidate("bob") is None  # bob saw it again already; repeats are not repeated
    rows = store.votes_with_pairs()
    assert repeat_judgements(rows) == [("alice", "left", "bob", "left"), ("alice", "left", "alice", "tie")]
    q = {x.annotator: x for x in annotator_quality(rows)}
    assert (q["bob"].repeats, q["bob"].agreement) == (1, 1.0)
    assert (q["alice"].repeats, q["alice"].agreement) == (2, 0.5)


def test_repeats_and_excluded_people_are_kept_but_not_trained_on(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    a = _voted_pair(store, "alice", "left", 0)
    _voted_pair(store, "mallory", "right", 1)
    store.record_vote(store.issue_repeat(a, "bob", swap=False), "bob", "left")
    train, _ = build_pairs(store.votes_with_pairs(), heldout_fraction=0.0)
    assert len(train) == 2  # alice + mallory; bob's repeat is a measurement
    assert store.count_votes(usable_only=True) == 2
    store.set_excluded("mallory", True, by="admin")
    train, _ = build_pairs(store.votes_with_pairs(), heldout_fraction=0.0)
    assert [p["vote_id"] for p in train] == [1]
    assert store.count_votes() == 3 and store.count_votes(usable_only=True) == 1  # nothing deleted
    store.set_excluded("mallory", False, by="admin")
    assert store.count_votes(usable_only=True) == 2


def test_the_annotation_service_shows_a_share_of_pairs_again(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    original = _voted_pair(store, "alice", "left")
    svc = Annotation(store, PromptQueue(store), serving=None, config=AnnotateConfig(repeat_rate=1.0))
    svc.rng = random.Random(0)
    shown = svc.next_pair("bob")  # no sampling: the stored answers, instantly
    assert {shown["left"], shown["right"]} == {"left answer 0", "right answer 0"}
    assert store.get_pair(shown["pair_id"]).repeat_of == original
    svc.vote("bob", shown["pair_id"], "tie")
    assert store.count_votes() == 2


def test_figures_are_tidy_frames_for_the_plots(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    for i, c in enumerate(["left", "right", "left"]):
        _voted_pair(store, "alice", c, i)
    df = figures.votes_over_time((f["created_at"], f["choice"]) for f in store.vote_facts())
    assert df[df.choice == "all"].votes.tolist() == [1, 2, 3]
    assert df[df.choice == "left"].votes.tolist() == [1, 2]
    many = figures.votes_over_time([(1.7e9 + i, ("left", "right", "tie")[i % 3]) for i in range(100_000)])
    assert len(many) <= 4 * 402  # about 400 points a line, whatever the count
    assert many[many.choice == "all"].votes.iloc[-1] == 100_000 and many[many.choice == "tie"].votes.max() == 33_333
    (tmp_path / "round-0001.metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "ipo/accuracy": 0.0}\n{"step": 2, "loss": 0.8, "ipo/accuracy": 0.75}\n'
        '{"event": "result", "train_loss": 0.9}\n')
    steps = figures.round_steps(tmp_path, live=("running", [{"step": 1, "loss": 0.5}]))
    assert steps[steps.metric == "loss"].groupby("round").value.apply(list).to_dict() == {
        "round-0001": [1.0, 0.8], "running": [0.5]}
    rounds = [{"round": 1, "config": {"train": {"loss": "ipo"}},
               "metrics": {"eval_ipo/accuracy": 0.8, "eval_rewards/accuracies": 0.4, "kl_per_token": 0.01}}]
    by = figures.by_round(rounds).set_index("metric").value.to_dict()
    assert by == {"held-out accuracy": 0.8, "KL to reference (nats/token)": 0.01}  # IPO: the per-token accuracy
    wr = figures.win_rates({"round-0001": (0.6, 0.5, 0.7)})
    assert wr.set_index("series")["win rate"].to_dict() == {"95% low": 0.5, "estimate": 0.6, "95% high": 0.7}


def test_prompts_come_from_a_dataset_column_of_text_or_messages(tmp_path):
    from datasets import Dataset

    from collector.prompts import PromptError
    from storage.votes import prompt_messages

    Dataset.from_list([
        {"prompt": "Plain text prompt?", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Chat prompt?"}]},
        {"prompt": "x" * 5000, "messages": [{"role": "user", "content": "Second chat prompt?"}]},
    ]).to_parquet(tmp_path / "prompts.parquet")
    store = VoteStore(tmp_path / "votes.db")
    queue = PromptQueue(store)
    assert queue.load(str(tmp_path / "prompts.parquet")) == 1  # the 5,000-character one is left out
    assert queue.load(str(tmp_path / "prompts.parquet"), column="messages") == 2
    conversations = [prompt_messages(r["text"], r["messages"]) for r in store.prompt_stats()]
    assert {c[-1]["content"] for c in conversations} == {"Plain text prompt?", "Chat prompt?", "Second chat prompt?"}
    assert [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chat prompt?"}] in conversations
    with pytest.raises(PromptError, match="no column 'question'; its columns: prompt, messages"):
        queue.load(str(tmp_path / "prompts.parquet"), column="question")
    assert queue.load(None) == 211  # the bundled file
