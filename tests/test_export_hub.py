"""Votes as a Hub dataset: export folder, TRL-ready config, pushes through huggingface_hub to a
local stand-in for the Hub (the real Hub cannot be reached here), imports.

    .venv/bin/python -m pytest tests/test_export_hub.py
"""

import json
import subprocess
import sys

import pytest

from storage.errors import StorageError
from storage.export import export_all
from storage.hub import HubSync
from storage.importer import import_pairs, normalise, seed_pairs
from storage.votes import VoteStore
from tests.conftest import ROOT, RunningApp
from tests.hubstub import HubStub

REPO = "user/prefloop-votes"


def _votes(store: VoteStore, choices: list[str], start: int = 0) -> None:
    for i, choice in enumerate(choices, start):
        text = f"Question {i}?"
        pid = store.issue_pair(
            annotator="alice" if i % 2 else "bob", prompt_id=store.prompt_id(text),
            messages=[{"role": "user", "content": text}], answer_left=f"Short answer {i}.",
            answer_right=f"A much longer answer number {i}, with detail.", model_left="base",
            model_right="round-0001", seed=i, params={"temperature": 0.9}, timings={})
        store.record_vote(pid, "alice" if i % 2 else "bob", choice)


@pytest.fixture
def store(tmp_path):
    s = VoteStore(tmp_path / "votes.db")
    _votes(s, ["left", "right", "tie", "both_bad", "left", "right", "left", "left"])
    return s


def test_export_folder_loads_with_both_configs(store, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "storage", "export", "--data-dir", str(tmp_path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "8 votes, 8 training pairs, 0 held-out pairs" in r.stdout
    # a fresh cache: datasets caches a local folder by its name alone (storage.importer.load_any)
    votes = load_dataset(str(out), "votes", split="train", cache_dir=str(tmp_path / "cache"))
    prefs = load_dataset(str(out), "preferences", split="train", cache_dir=str(tmp_path / "cache"))
    splits = load_dataset(str(out), "preferences", cache_dir=str(tmp_path / "cache"))
    assert len(votes) == 8 and len(prefs) == 8  # the tie as both orderings; both-bad in votes only
    assert len(splits.get("test", [])) == 0  # no prompt here is held out: the empty split still loads
    assert sorted(set(votes["choice"])) == ["both_bad", "left", "right", "tie"]
    assert "alice" not in votes["annotator"] and len(votes[0]["annotator"]) == 16  # salted hash
    row = prefs[1]  # vote 2 chose right
    assert row["chosen"] == [{"role": "assistant", "content": "A much longer answer number 1, with detail."}]
    assert row["chosen_model"] == "round-0001" and row["prompt"][0]["role"] == "user"
    card = (out / "README.md").read_text()
    assert "config_name: preferences" in card and "config_name: votes" in card and "8 votes" in card
    again = subprocess.run([sys.executable, "-m", "storage", "export", "--data-dir", str(tmp_path), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites a segment


def test_stock_dpo_trainer_trains_a_step_on_the_preferences_config(store, tmp_path, smollm2_dir):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from storage.export import export_all

    export_all(store, tmp_path / "export", salt="s")
    ds = load_dataset(str(tmp_path / "export"), "preferences", split="train", cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32"),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2,
                       use_cpu=True, bf16=False, report_to="none", max_length=64, logging_steps=1,
                       gradient_checkpointing=False, save_strategy="no"),
        train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    out = trainer.train()
    assert out.global_step == 1
    assert out.training_loss == pytest.approx(0.6931, abs=1e-3)  # DPO's log(2) at policy == reference


@pytest.fixture
def hub():
    stub = HubStub()
    yield stub
    stub.close()


def _sync(store, tmp_path, hub, **kw) -> HubSync:
    from huggingface_hub import HfApi

    return HubSync(store, tmp_path / "hub", REPO, HfApi(endpoint=hub.url, token="hf_stand_in"),
                   backoff_s=0.01, **kw)


def test_push_uploads_new_segments_once_to_a_private_repo(store, tmp_path, hub):
    sync = _sync(store, tmp_path, hub)
    assert sync.push() == 3  # a votes segment, the preferences snapshot (no prompt held out: train only), the card
    files = dict(hub.files(REPO))
    assert sorted(p.split("/")[0] for p in files) == ["README.md", "preferences", "votes"]
    assert hub.private[REPO] is True
    assert hub.validated >= 1  # the dataset card's YAML passed the Hub's validation call
    assert sync.push() == 0  # nothing new: no commit
    _votes(store, ["right", "tie"], start=100)
    assert sync.push() == 3  # a new votes segment; the preferences snapshot replaces its last one
    assert len(hub.files(REPO)) == 4 and len(hub.commits) == 2
    assert hub.overwrites == []
    assert sorted(hub.deletes) == sorted(p for p in files if p.startswith("preferences/"))  # the last snapshot
    assert sync.refresh_status().pending_rows == 0 and sync.status.last_error is None


def test_a_push_failing_mid_way_is_retried_without_duplicates(store, tmp_path, hub):
    sync = _sync(store, tmp_path, hub, retries=1)
    hub.fail_before = 1
    assert sync.push() == 0
    assert "injected failure" in sync.status.last_error and sync.refresh_status().pending_files == 2
    assert hub.files(REPO) == {}
    hub.fail_after = 1  # the commit lands but its answer is lost
    assert sync.push() == 0 and sync.status.last_error
    landed = dict(hub.files(REPO))
    assert len(landed) == 3
    assert sync.push() == 0  # the retry finds the files there and uploads nothing
    assert sync.status.last_error is None and sync.refresh_status().pending_files == 0
    assert hub.files(REPO) == landed and hub.overwrites == []


def test_a_restart_with_an_empty_staging_dir_overwrites_nothing(store, tmp_path, hub):
    import shutil

    _sync(store, tmp_path, hub).push()
    before = dict(hub.files(REPO))
    shutil.rmtree(tmp_path / "hub")  # e.g. a Space rebuilt without its staging folder
    _votes(store, ["left"], start=200)
    restarted = _sync(store, tmp_path, hub)  # a new boot id
    assert restarted.push() == 3  # a new votes segment, this replica's new snapshot, its last one deleted
    after = hub.files(REPO)
    kept = [k for k in before if not k.startswith("preferences/")]
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert hub.overwrites == [] and hub.deletes and all(p.startswith("preferences/") for p in hub.deletes)
    assert len(after) == len(before) + 1


def test_two_replicas_push_to_one_repo_without_collisions(tmp_path, hub):
    """Two app replicas (their own databases, so their vote ids overlap) share one dataset repo."""
    from datasets import load_dataset

    replicas = []
    for name, choices in (("a", ["left", "right", "left"]), ("b", ["right", "left"])):
        store = VoteStore(tmp_path / name / "votes.db")
        _votes(store, choices)
        replicas.append((_sync(store, tmp_path / name, hub), store))
    for sync, _ in replicas:
        assert sync.push() >= 2 and sync.status.last_error is None
    assert hub.overwrites == [] and hub.deletes == []
    local = tmp_path / "downloaded"
    for path, data in hub.files(REPO).items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    prefs = load_dataset(str(local), "preferences", split="train", cache_dir=str(tmp_path / "cache"))
    assert len(prefs) == 5
    assert len(set(prefs["vote_id"])) < 5  # vote ids collide across replicas...
    assert len(set(prefs["pair_id"])) == 5  # ...pair ids do not: the dedupe key


def test_without_a_repo_or_token_votes_stay_local(store, tmp_path):
    sync = HubSync(store, tmp_path / "hub", None, None)
    assert sync.push() == 0
    assert "locally only" in sync.status.line()
    assert sync.refresh_status().pending_files == 2  # staged, ready for when a token is given


def test_import_accepts_string_and_conversational_pairs(tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    standard = tmp_path / "standard.jsonl"
    standard.write_text(json.dumps({"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."}))
    conversational = tmp_path / "conversational.jsonl"
    conversational.write_text(json.dumps({
        "prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}))
    for path in (standard, conversational):
        r = subprocess.run([sys.executable, "-m", "storage", "import", str(path), "--data-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "imported 1 new seed pairs" in r.stdout
    assert import_pairs(store, str(standard)) == 0  # idempotent
    pairs = seed_pairs(store)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Four."}]
    assert pairs[1]["rejected"] == [{"role": "assistant", "content": "Go away."}]


def test_import_takes_an_implicit_prompt_and_refuses_bad_rows():
    shared = [{"role": "user", "content": "Hi"}]
    prompt, chosen, rejected = normalise({
        "chosen": shared + [{"role": "assistant", "content": "Hello"}],
        "rejected": shared + [{"role": "assistant", "content": "No"}]})
    assert prompt == shared and chosen[0]["content"] == "Hello" and rejected[0]["content"] == "No"
    with pytest.raises(StorageError, match="needs 'chosen' and 'rejected'"):
        normalise({"prompt": "x", "answer": "y"})


def test_the_app_pushes_its_last_votes_on_sigterm(engine, smollm2_dir, tmp_path, hub):
    app = RunningApp(tmp_path / "data", engine, smollm2_dir,
                     ["--hub-dataset", REPO, "--hub-every-minutes", "60", "--round-every-votes", "0"],
                     env={"HF_TOKEN": "hf_stand_in", "HF_ENDPOINT": hub.url})
    try:
        client = app.client("alice")
        for choice in ("left", "tie"):
            pair = client.predict("", api_name="/next_pair")
            client.predict(pair["pair_id"], choice, api_name="/vote")
        assert hub.files(REPO) == {}  # the periodic push has not run yet
    finally:
        assert app.stop() == 0
    files = hub.files(REPO)
    # the card and both configs (preferences has a test file too when a voted prompt is held out)
    assert sorted({p.split("/")[0] for p in files}) == ["README.md", "preferences", "votes"]
    import io

    import pyarrow.parquet as pq

    votes = pq.read_table(io.BytesIO(next(b for p, b in files.items() if p.startswith("votes/"))))
    assert sorted(votes.column("choice").to_pylist()) == ["left", "tie"]


def test_two_export_folders_of_the_same_name_load_their_own_rows(tmp_path):
    # datasets caches a local folder by its name and config: the importer must not be fooled.
    from storage.importer import load_rows

    for run, winner in (("first", "A"), ("second", "B")):
        store = VoteStore(tmp_path / run / "votes.db")
        pid = store.issue_pair(annotator="alice", prompt_id=None, messages=[{"role": "user", "content": "q"}],
                               answer_left=winner, answer_right="other", model_left="base", model_right="base",
                               seed=1, params={}, timings={})
        store.record_vote(pid, "alice", "left")
        export_all(store, tmp_path / run / "export", salt="s")
        assert [r["chosen"][0]["content"] for r in load_rows(str(tmp_path / run / "export"))] == [winner]


def test_a_failed_preferences_export_never_deletes_the_last_pushed_snapshot(store, tmp_path, hub, monkeypatch):
    import storage.hub

    sync = _sync(store, tmp_path, hub, retries=1)
    assert sync.push() == 3
    pushed = {p for p in hub.files(REPO) if p.startswith("preferences/")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    _votes(store, ["left"], start=300)
    hub.fail_before = 1
    assert sync.push() == 0  # staged (a votes segment, a new snapshot), not pushed
    monkeypatch.setattr(storage.hub, "export_preferences", full_disk)
    _votes(store, ["right"], start=301)
    assert sync.push() == 2  # the two votes segments; the half-made snapshot is not pushed...
    assert "staging failed" in sync.status.last_error
    assert {p for p in hub.files(REPO) if p.startswith("preferences/")} == pushed and hub.deletes == []  # ...nor lost
    monkeypatch.undo()
    assert sync.push() == 2 and hub.deletes == sorted(pushed)  # fixed: the new snapshot replaces the last one


def test_the_upgrade_leaves_segments_of_a_newer_schema_alone(store, tmp_path, hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token="hf_stand_in")
    api.create_repo(REPO, repo_type="dataset", private=True)
    api.create_commit(REPO, repo_type="dataset", commit_message="a newer PrefLoop", operations=[
        CommitOperationAdd("votes/20270101T000000-abcd-000001.v3.parquet", b"PAR1 a newer schema")])
    assert _sync(store, tmp_path, hub).push() == 3
    assert "votes/20270101T000000-abcd-000001.v3.parquet" in hub.files(REPO) and hub.deletes == []
