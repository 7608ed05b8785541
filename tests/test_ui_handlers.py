"""The Annotate tab's handlers, called as Gradio calls them but without a browser or a model:
a real vote store, the real access rules, requests that carry only what Gradio's would."""

import asyncio
from types import SimpleNamespace

import gradio as gr
import pytest

from collector.annotate import AnnotateConfig, Annotation
from collector.prompts import PromptQueue
from collector.users import Access
from storage.votes import VoteStore
from ui import annotate


def _request(name: str | None):
    return SimpleNamespace(username=name, session_hash="s", request=None, headers={}, client=None)


@pytest.fixture
def ui(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    svc = Annotation(store, PromptQueue(store), serving=None, config=AnnotateConfig())
    access = Access("password", store, admins={"alice"})
    pid = store.issue_pair(annotator="bob", prompt_id=store.prompt_id("Say hi."),
                           messages=[{"role": "user", "content": "Say hi."}], answer_left="Hi!",
                           answer_right="Hello.", model_left="base", model_right="base", seed=1, params={},
                           timings={})
    return svc, access, store, pid


def test_a_vote_is_recorded_and_turns_the_buttons_off(ui):
    svc, access, store, pid = ui
    view = asyncio.run(annotate.vote(svc, access, "left", pid, "", _request("bob")))
    assert view["pair_id"] is None and view["status"].startswith("Vote #1 recorded")
    assert {k for k, v in view.items() if isinstance(v, gr.Button) and v.interactive is False} == \
        {"vote-a", "vote-b", "vote-tie", "vote-bad"}
    assert store.count_votes() == 1


def test_a_vote_on_someone_elses_pair_or_without_a_login_is_refused_and_nothing_is_stored(ui):
    svc, access, store, pid = ui
    with pytest.raises(gr.Error, match="issued to another annotator|not yours|another"):
        asyncio.run(annotate.vote(svc, access, "left", pid, "", _request("carol")))
    with pytest.raises(gr.Error):
        asyncio.run(annotate.vote(svc, access, "left", pid, "", _request(None)))
    with pytest.raises(gr.Error, match="wait for both answers"):
        asyncio.run(annotate.vote(svc, access, "left", None, "", _request("bob")))
    assert store.count_votes() == 0


def test_a_reload_shows_the_unvoted_pair_again_without_generating(ui):
    svc, access, _, pid = ui
    views = list(annotate.first_pair(svc, access, _request("bob")))  # serving=None: a generation would fail
    assert len(views) == 1 and views[0]["pair_id"] == pid
    assert "Hi!" in views[0]["left"] and "Hello." in views[0]["right"]
    assert set(views[0]) == {*annotate.PAIR_VIEW, "guidelines"}


def test_someone_not_listed_gets_the_notice_and_no_pair(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    svc = Annotation(store, PromptQueue(store), serving=None, config=AnnotateConfig())
    access = Access("hf", store, admins={"alice"})
    req = SimpleNamespace(username=None, session_hash="s", headers={}, client=None,
                          request=SimpleNamespace(session={"oauth_info": {"userinfo": {
                              "sub": "42", "preferred_username": "mallory<b>", "name": "M"}}}))
    views = list(annotate.first_pair(svc, access, req))
    assert len(views) == 1 and views[0]["pair_id"] is None
    assert "not among this app's annotators" in views[0]["prompt"] and "mallory&lt;b&gt;" in views[0]["prompt"]


def test_change_my_last_vote_shows_the_pair_again_and_a_new_choice_replaces_the_vote(ui):
    svc, access, store, pid = ui
    voted = asyncio.run(annotate.vote(svc, access, "left", pid, "", _request("bob")))
    assert voted["last"] == pid
    view = annotate.change_vote(svc, access, voted["last"], _request("bob"))
    assert view["pair_id"] == pid and "You said **A is better**" in view["status"]
    assert all(view[eid].interactive for eid in ("vote-a", "vote-b", "vote-tie", "vote-bad"))
    asyncio.run(annotate.vote(svc, access, "right", pid, "second thoughts", _request("bob")))
    assert store.current_choice(pid) == "right" and [c for _, c, _ in store.vote_history(pid)] == ["left", "right"]
    with pytest.raises(gr.Error, match="no vote of yours"):
        annotate.change_vote(svc, access, pid, _request("carol"))  # not carol's pair


def test_an_annotator_sees_their_agreement_with_others_and_the_votes_until_the_next_round(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    left_to_go = [5]
    svc = Annotation(store, PromptQueue(store), serving=None, config=AnnotateConfig(),
                     votes_to_next_round=lambda: left_to_go[0])
    msgs = [{"role": "user", "content": "Say hi."}]
    originals = [store.issue_pair(annotator="alice", prompt_id=store.prompt_id(f"Say hi {i}."), messages=msgs,
                                  answer_left="Hi!", answer_right="Hello.", model_left="base", model_right="base",
                                  seed=i, params={}, timings={}) for i in range(2)]
    for pid in originals:
        store.record_vote(pid, "alice", "left")
    same = store.issue_repeat(originals[0], "bob", swap=True)  # bob sees the sides swapped
    store.record_vote(same, "bob", "right")  # ... and agrees with alice
    other = store.issue_repeat(originals[1], "bob", swap=False)
    store.record_vote(other, "bob", "tie")  # ... and does not
    line = annotate._counts_md(svc, "bob")
    assert "you agree with others on **1 of 2** pairs" in line and "next round in **5** votes" in line
    assert "agree" in annotate._counts_md(svc, "alice")
    left_to_go[0] = None  # rounds do not start on votes: nothing said
    assert "next round" not in annotate._counts_md(svc, "bob")
