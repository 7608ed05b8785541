"""Guidelines and reasons: what "better" means here, shown to annotators, versioned by content,
kept with each vote and in the exported dataset; a short optional reason with a vote."""

import asyncio
from types import SimpleNamespace

import pytest

from collector.annotate import AnnotateConfig, Annotation
from collector.prompts import PromptQueue
from collector.users import Access
from storage.errors import VoteRejected
from storage.export import export_all
from storage.votes import MAX_REASON_CHARS, VoteStore
from ui import annotate

GUIDE = "# Be brief\n\nPrefer the answer that says it in fewer words, if it is still right."


def _pair(store: VoteStore, who: str = "bob", n: int = 0) -> str:
    return store.issue_pair(annotator=who, prompt_id=store.prompt_id(f"Say hi {n}."),
                            messages=[{"role": "user", "content": f"Say hi {n}."}], answer_left="Hi!",
                            answer_right="Hello there, how are you?", model_left="base", model_right="base",
                            seed=n, params={}, timings={})


def _service(tmp_path, text: str = GUIDE) -> tuple[VoteStore, Annotation]:
    store = VoteStore(tmp_path / "votes.db")
    return store, Annotation(store, PromptQueue(store), serving=None, config=AnnotateConfig(guidelines=text))


def test_a_vote_carries_the_guidelines_version_and_its_reason(tmp_path):
    store, svc = _service(tmp_path)
    out = svc.vote("bob", _pair(store), "left", reason="  shorter, and still right  ")
    assert store.vote_notes(out["vote_id"]) == ("shorter, and still right", svc.guideline_version)
    [g] = store.guidelines()
    assert g["version"] == svc.guideline_version and g["text"] == GUIDE and g["votes"] == 1
    # A new text is a new version; the old one and its votes stay.
    _, svc2 = _service(tmp_path, GUIDE + "\n\nTies are fine when both are right.")
    assert svc2.guideline_version != svc.guideline_version and len(store.guidelines()) == 2
    assert svc2.guidelines_unread("bob")  # a new version opens again for everyone


def test_a_reason_too_long_is_refused_and_nothing_is_stored(tmp_path):
    store, svc = _service(tmp_path)
    with pytest.raises(VoteRejected, match=f"keep it under {MAX_REASON_CHARS}"):
        svc.vote("bob", _pair(store), "left", reason="x" * (MAX_REASON_CHARS + 1))
    assert store.count_votes() == 0
    assert svc.guidelines_unread("bob")


def _request(name):
    return SimpleNamespace(username=name, session_hash="s", request=None, headers={}, client=None)


def test_the_tab_opens_the_guidelines_until_a_vote_under_them_and_stores_the_typed_reason(tmp_path):
    store, svc = _service(tmp_path)
    access = Access("password", store, admins={"alice"})
    pid = _pair(store)
    [first] = list(annotate.first_pair(svc, access, _request("bob")))  # resumes the open pair
    assert first["guidelines"].visible is True and first["guidelines"].open is True
    view = asyncio.run(annotate.vote(svc, access, "left", pid, "fewer words", _request("bob")))
    assert view["reason"] == "" and view["guidelines"].open is False  # cleared, folded away
    assert store.vote_notes(1) == ("fewer words", svc.guideline_version)
    _pair(store, n=1)
    [again] = list(annotate.first_pair(svc, access, _request("bob")))
    assert again["guidelines"].open is False  # read: it stays folded on the next visit


def test_without_guidelines_the_pane_is_hidden_and_votes_carry_no_version(tmp_path):
    store, svc = _service(tmp_path, text="")
    access = Access("password", store, admins={"alice"})
    pid = _pair(store)
    [first] = list(annotate.first_pair(svc, access, _request("bob")))
    assert first["guidelines"].visible is False
    asyncio.run(annotate.vote(svc, access, "right", pid, "", _request("bob")))
    assert store.vote_notes(1) == (None, None) and store.guidelines() == []


def test_the_export_holds_each_version_and_the_card_lists_them(tmp_path):
    store, svc = _service(tmp_path)
    svc.vote("bob", _pair(store), "left")
    export_all(store, tmp_path / "out", salt="s")
    version = svc.guideline_version
    assert (tmp_path / "out" / "guidelines" / f"{version}.md").read_text().strip() == GUIDE
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{version}`" in card and "1 votes" in card


def test_a_guidelines_file_that_cannot_serve_stops_the_app_in_one_line(tmp_path):
    from app import read_guidelines
    from storage.errors import UserError

    with pytest.raises(UserError, match="cannot read it"):
        read_guidelines(tmp_path / "missing.md")
    (tmp_path / "huge.md").write_text("x" * 20_001)
    with pytest.raises(UserError, match="keep guidelines under"):
        read_guidelines(tmp_path / "huge.md")
    (tmp_path / "ok.md").write_text(GUIDE)
    assert read_guidelines(tmp_path / "ok.md") == GUIDE
