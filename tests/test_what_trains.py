"""One definition of what trains (storage.pairs): the exported ``preferences`` config is, pair by
pair, what a real round trained on and scored, and the ``votes`` config keeps every vote with its
finish reasons, reason, guideline, supersession and exclusion; segments written under the older
``votes`` schema load with the new ones once a push has brought the repo up to date.

    .venv/bin/python -m pytest tests/test_what_trains.py
"""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.export import ADDED, export_all, vote_rows
from storage.hub import HubSync
from storage.pairs import is_heldout
from storage.serving import ServingLog
from storage.votes import VoteStore
from tests.hubstub import HubStub
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds

HELDOUT = 0.3
OLD_CARD = b"---\nconfigs:\n- config_name: votes\n  data_files: votes/*.parquet\n---\n"
PEOPLE = ["ann", "ben", "cat", "dan", "eve"]


def _pair(store: VoteStore, who: str, i: int, finish=("stop", "stop")) -> str:
    text = f"Tell me something useful, number {i}."
    return store.issue_pair(
        annotator=who, prompt_id=store.prompt_id(text, source="test"), messages=[{"role": "user", "content": text}],
        answer_left=f"Short and useful {i}.", answer_right=f"A long winding answer {i} that says little at all",
        model_left="base", model_right="base", seed=i, params={"temperature": 0.9}, timings={},
        finish_reasons=finish)


@pytest.fixture
def log(tmp_path):
    """Votes of every kind: left/right, ties, both-bad, cut answers, a changed vote, an excluded
    person, a repeat, with a reason and a guideline version; some prompts fall in the held-out slice."""
    store = VoteStore(tmp_path / "votes.db")
    version = store.add_guidelines("# Be brief\n")
    choices = ["left", "right", "left", "tie", "left", "both_bad", "left", "right"]
    ids = {}
    for i in range(40):
        who = PEOPLE[i % len(PEOPLE)]
        finish = ("stop", "length") if i % 7 == 0 else ("stop", "stop")
        pid = _pair(store, who, i, finish)
        ids[i] = (pid, who)
        store.record_vote(pid, who, choices[i % len(choices)], reason="shorter" if i == 4 else None,
                          guideline=version)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    pid = store.issue_pair(annotator="dan", prompt_id=store.prompt_id(conversation, source="test"),
                           messages=conversation, answer_left="Red.", answer_right="Well, there are many colours",
                           model_left="base", model_right="base", seed=99, params={}, timings={},
                           finish_reasons=("stop", "length"))
    store.record_vote(pid, "dan", "left", guideline=version)  # a follow-up: trained with its turns
    changed_pid, changed_who = ids[1]
    store.record_vote(changed_pid, changed_who, "left", guideline=version)  # second thoughts: right -> left
    store.record_vote(store.issue_repeat(ids[0][0], "cat", swap=True), "cat", "right")  # agreement only
    store.set_excluded("eve", True, by="admin")
    ServingLog(store).record([])
    return store, tmp_path


def _key(p: dict) -> tuple:
    return (p["vote_id"], json.dumps(p["prompt"]), p["chosen"][0]["content"], p["rejected"][0]["content"],
            bool(p["chosen_cut"]), bool(p["rejected_cut"]))


def test_the_exported_preferences_are_what_a_round_trained_and_scored(log, tiny_mistral_dir):
    from datasets import load_dataset

    store, tmp = log
    rounds = Rounds(store, tmp, str(tiny_mistral_dir))
    cfg = RoundConfig(heldout_fraction=HELDOUT, min_heldout_accuracy=0.0, max_share=1.0,  # no cap: every vote now
                      train=TrainConfig(epochs=1, max_length=64, learning_rate=5e-4))
    manifest = rounds.run(cfg)
    assert manifest["status"] == "promoted", manifest["reason"]
    spec = json.loads((tmp / "rounds" / f"{manifest['adapter']}.spec.json").read_text())

    counts = export_all(store, tmp / "export", salt="s", heldout_fraction=HELDOUT)
    prefs = load_dataset(str(tmp / "export"), "preferences", cache_dir=str(tmp / "cache"))
    assert [_key(p) for p in prefs["train"]] == [_key(p) for p in spec["train"]]
    assert [_key(p) for p in prefs["test"]] == [_key(p) for p in spec["heldout"]]
    assert (counts["train"], counts["test"]) == (len(spec["train"]), len(spec["heldout"]))
    assert manifest["train_pairs"] == len(spec["train"]) and spec["heldout"]  # the slice is not empty

    train = list(prefs["train"]) + list(prefs["test"])
    excluded_votes = {v["vote_id"] for v in store.votes_with_pairs(superseded=True) if v["annotator"] == "eve"}
    assert excluded_votes and not excluded_votes & {p["vote_id"] for p in train}
    assert all(p["choice"] != "both_bad" for p in train)
    ties = [p for p in prefs["train"] if p["choice"] == "tie"]
    assert ties and len(ties) == 2 * len({p["vote_id"] for p in ties})  # both orderings
    assert all(p["choice"] != "tie" for p in prefs["test"])  # a held-out tie is neither trained nor scored
    assert any(p["rejected_cut"] or p["chosen_cut"] for p in train)
    assert [p["prompt"] for p in train if p["prompt"][0]["role"] == "system"] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]]
    changed = [p for p in train if p["prompt"][0]["content"] == "Tell me something useful, number 1."]
    assert [p["choice"] for p in changed] == ["left"]  # the changed vote, not the one it replaced
    assert not [p for p in train if p["pair_id"] in {v["pair_id"] for v in store.votes_with_pairs()
                                                     if v.get("repeat_of")}]
    heldout_prompts = {p["prompt"][0]["content"] for p in prefs["test"]}
    assert all(is_heldout(p["prompt"], HELDOUT) for p in prefs["test"])
    assert not heldout_prompts & {p["prompt"][0]["content"] for p in prefs["train"]}


def test_the_votes_config_keeps_every_vote_with_its_notes(log):
    from datasets import load_dataset

    store, tmp = log
    export_all(store, tmp / "export", salt="s")
    votes = load_dataset(str(tmp / "export"), "votes", split="train", cache_dir=str(tmp / "cache"))
    assert len(votes) == 43  # 41 votes, the replaced one and the repeat: nothing left out of the log
    by_pair = {}
    for v in votes:
        by_pair.setdefault(v["pair_id"], []).append(v)
    changed = next(rows for rows in by_pair.values() if len(rows) == 2)
    assert [(r["choice"], r["superseded"]) for r in sorted(changed, key=lambda r: r["vote_id"])] == \
        [("right", True), ("left", False)]
    assert sum(v["excluded"] for v in votes) == 8  # eve's votes: kept, marked
    assert sum(v["finish_right"] == "length" for v in votes) >= 5
    assert {v["finish_left"] for v in votes if not v["repeat_of"]} == {"stop"}  # the repeat swapped sides
    assert [v["reason"] for v in votes if v["reason"]] == ["shorter"]
    assert {v["guideline"] for v in votes if not v["repeat_of"]} == {store.guidelines()[0]["version"]}


def test_a_repo_written_under_the_older_schema_is_upgraded_and_loads_as_one_table(log):
    """The Hub stand-in (tests/hubstub.py) holds what an older PrefLoop pushed: vote segments
    without the new columns, preference segments, its card. One push brings it up to date."""
    from datasets import load_dataset
    from huggingface_hub import CommitOperationAdd, HfApi

    store, tmp = log
    hub = HubStub()
    try:
        api = HfApi(endpoint=hub.url, token="hf_stand_in")
        repo = "me/prefloop-votes"
        api.create_repo(repo, repo_type="dataset", private=True)
        old = [{k: v for k, v in row.items() if k not in ADDED[2]}
               for row in vote_rows(store.votes_with_pairs(0, 10, superseded=True), "s")]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(old), buf)
        v2 = [{k: v for k, v in row.items() if k not in ADDED[3]}  # a later replica, under schema 2
              for row in vote_rows(store.votes_with_pairs(10, 20, superseded=True), "s")]
        buf2 = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(v2), buf2)
        api.create_commit(repo, repo_type="dataset", commit_message="an older PrefLoop", operations=[
            CommitOperationAdd("votes/20260101T000000-abcd-000001.parquet", buf.getvalue()),
            CommitOperationAdd("votes/20260201T000000-ef01-000001.v2.parquet", buf2.getvalue()),
            CommitOperationAdd("preferences/20260101T000000-abcd-000001.parquet", buf.getvalue()),
            CommitOperationAdd("README.md", OLD_CARD)])
        store.set_setting("hub_staged_watermark", "20")  # those votes were pushed by the older versions
        sync = HubSync(store, tmp / "hub", repo, api, backoff_s=0.01, salt="s")
        assert sync.push() > 0 and sync.status.last_error is None
        files = hub.files(repo)
        assert "votes/20260101T000000-abcd-000001.parquet" not in files  # upgraded under the new suffix
        assert "votes/20260201T000000-ef01-000001.v2.parquet" not in files
        assert "votes/20260201T000000-ef01-000001.v3.parquet" in files
        assert not [p for p in files if p.startswith("preferences/") and p.count("/") == 1]
        local = tmp / "downloaded"
        for path, data in files.items():
            (local / path).parent.mkdir(parents=True, exist_ok=True)
            (local / path).write_bytes(data)
        votes = load_dataset(str(local), "votes", split="train", cache_dir=str(tmp / "cache"))
        assert len(votes) == 43 and set(votes.column_names) >= set(ADDED[2]) | set(ADDED[3])
        old_rows = [v for v in votes if v["vote_id"] <= 10]
        assert old_rows and all(v["finish_left"] == "" and v["superseded"] is False for v in old_rows)
        assert all(v["judge"] is False for v in votes if v["vote_id"] <= 20)
        prefs = load_dataset(str(local), "preferences", cache_dir=str(tmp / "cache"))
        assert len(prefs["train"]) > 0 and "test" in prefs
        assert "path: preferences/train/*.parquet" in files["README.md"].decode()
        commits = len(hub.commits)
        assert sync.push() == 0 and len(hub.commits) == commits  # up to date: nothing more to do
    finally:
        hub.close()


def test_an_unreadable_old_segment_is_left_alone_and_new_votes_still_reach_the_hub(log):
    """One damaged file an older PrefLoop left in the repo must not stop every later push."""
    from huggingface_hub import CommitOperationAdd, HfApi

    store, tmp = log
    hub = HubStub()
    try:
        api = HfApi(endpoint=hub.url, token="hf_stand_in")
        repo = "me/prefloop-votes"
        api.create_repo(repo, repo_type="dataset", private=True)
        api.create_commit(repo, repo_type="dataset", commit_message="an older PrefLoop", operations=[
            CommitOperationAdd("votes/20260101T000000-dead-000001.v2.parquet", b"not parquet at all"),
            CommitOperationAdd("README.md", OLD_CARD)])
        sync = HubSync(store, tmp / "hub", repo, api, backoff_s=0.01, salt="s")
        assert sync.push() > 0 and sync.status.last_error is None
        files = hub.files(repo)
        assert files["votes/20260101T000000-dead-000001.v2.parquet"] == b"not parquet at all"  # left as it was
        assert [p for p in files if p.startswith("votes/") and p.endswith(".v3.parquet")]  # the new votes
    finally:
        hub.close()
