"""Promoted adapters published to a Hub model repo: one commit and one tag per round, never
overwriting, retried without half-publishing; a vLLM server with its own data dir serves a
published round by name.

The Hub cannot be reached from here: the pushes go to tests/hubstub.py, a local stand-in for the
Hub's HTTP API, through huggingface_hub's own client.

    .venv/bin/python -m pytest tests/test_publish.py
"""

from __future__ import annotations

import json
import time

import pytest
from huggingface_hub import HfApi

from collector.engine import Engine
from collector.sampling import SamplingParams, sample_pair
from storage.rounds import RoundLog
from storage.votes import VoteStore
from tests.conftest import HUB_ADAPTERS, make_adapter
from trainer.publish import Publisher, round_card


def _promoted(data, log: RoundLog, smollm2_dir, n: int, seed: int) -> str:
    """A promoted round as a round leaves it: the adapter folder, the manifest, the rounds row."""
    name = f"round-{n:04d}"
    make_adapter(smollm2_dir, data / "adapters" / name, seed=seed)
    round_id = log.start(watermark=10 * n, pid=0)
    assert round_id == n
    manifest = {"round": n, "adapter": name, "watermark": 10 * n, "base_model": str(smollm2_dir), "init": None,
                "train_pairs": 40, "reason": "passed: finite loss, held-out accuracy 0.80 on 10 pairs",
                "config": {"train": {"loss": "ipo", "sft_weight": 0.2, "lora_r": 8}}, "finished_at": time.time(),
                "metrics": {"heldout_pairs": 10, "heldout_correct": 8, "kl_per_token": 0.0412}}
    (data / "rounds").mkdir(exist_ok=True)
    (data / "rounds" / f"{name}.json").write_text(json.dumps(manifest))
    log.finish(n, "promoted", manifest["reason"], name)
    return name


@pytest.fixture
def published(tmp_path, smollm2_dir, hub_stub):
    log = RoundLog(VoteStore(tmp_path / "votes.db"))
    repo = f"me/publish-{tmp_path.name}"
    return tmp_path, log, Publisher(log, tmp_path, repo, HfApi(endpoint=hub_stub.url, token="hf_x"), backoff_s=0.01)


def test_each_promotion_adds_one_tagged_revision_and_touches_nothing_else(published, smollm2_dir, hub_stub):
    data, log, pub = published
    first = pub.publish(_promoted(data, log, smollm2_dir, 1, seed=1), win_rate=(0.62, 0.51, 0.71),
                        dataset=("me/votes", "abc123"))
    files_1 = hub_stub.model_files(pub.repo, "round-0001")
    assert set(files_1) == {"README.md", "round-0001/README.md", "round-0001/adapter_config.json",
                            "round-0001/adapter_model.safetensors"}
    card = files_1["round-0001/README.md"].decode()
    for fact in ("held-out accuracy | 0.80 (8 of 10 pairs)", "0.0412", "0.62 (95% interval 0.51-0.71",
                 str(smollm2_dir), "me/votes", "abc123"):
        assert fact in card, fact
    overwrites = len(hub_stub.overwrites)
    second = pub.publish(_promoted(data, log, smollm2_dir, 2, seed=2))
    assert second.new and second.revision != first.revision
    assert hub_stub.tags[pub.repo] == {"round-0001": first.revision, "round-0002": second.revision}
    assert hub_stub.model_files(pub.repo, "round-0001") == files_1  # the first round's revision is as it was
    latest = hub_stub.model_files(pub.repo)
    assert {k: v for k, v in latest.items() if not k.startswith("round-0002/")} == files_1  # nothing else touched
    assert len(hub_stub.overwrites) == overwrites and not hub_stub.deletes
    commits = len(hub_stub.commits)
    again = pub.publish("round-0002")  # published already: nothing new
    assert not again.new and again.revision == second.revision and len(hub_stub.commits) == commits
    assert log.published(2) == (pub.repo, second.revision)


def test_a_failed_push_is_retried_and_never_half_publishes(published, smollm2_dir, hub_stub):
    data, log, pub = published
    name = _promoted(data, log, smollm2_dir, 1, seed=3)
    hub_stub.fail_before = 1  # refused before anything is applied
    out = pub.publish(name)
    assert out.new and hub_stub.tags[pub.repo] == {name: out.revision}
    name = _promoted(data, log, smollm2_dir, 2, seed=4)
    hub_stub.fail_after = 1  # applied, but the answer is lost: the retry must only tag it
    overwrites = len(hub_stub.overwrites)
    out = pub.publish(name)
    assert hub_stub.tags[pub.repo][name] == out.revision
    assert len(hub_stub.overwrites) == overwrites  # the folder was not uploaded twice
    assert "round-0002/adapter_model.safetensors" in hub_stub.model_files(pub.repo, name)
    hub_stub.fail_before = 10
    name = _promoted(data, log, smollm2_dir, 3, seed=5)
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="injected failure"):
        pub.publish(name)
    hub_stub.fail_before = 0
    assert name not in hub_stub.tags[pub.repo] and log.published(3) is None  # not published: no tag, no record
    assert not any(p.startswith(f"{name}/") for p in hub_stub.model_files(pub.repo))
    assert pub.unpublished() == [name]


def test_a_server_with_its_own_data_dir_serves_a_published_round_by_name(tmp_path, smollm2_dir, hub_stub, engine):
    log = RoundLog(VoteStore(tmp_path / "votes.db"))
    pub = Publisher(log, tmp_path, HUB_ADAPTERS, HfApi(endpoint=hub_stub.url, token="hf_x"), backoff_s=0.01)
    name = _promoted(tmp_path, log, smollm2_dir, 1, seed=7)
    pub.publish(name)
    # The shared server has no access to tmp_path: it fetches the round from the (stand-in) Hub.
    remote = Engine.attach([engine.endpoints[0].url], engine.endpoints[0].api_key, hub_repo=HUB_ADAPTERS)
    remote.load_adapter(name, tmp_path / "adapters" / name)
    assert f"{HUB_ADAPTERS}/{name}" in remote.models(raw=True)
    ask = [{"role": "user", "content": "Name a colour."}]
    served = remote.chat(ask, model=name, temperature=0.0, max_tokens=12)[0]
    base = remote.chat(ask, model="base", temperature=0.0, max_tokens=12)[0]
    assert served and served != base  # the adapter is applied
    pair = sample_pair(remote, ask, SamplingParams(max_tokens=8), seed=1, model=name)
    assert pair.models == (name, name)  # a pair records the round, not the Hub name
    remote.unload_adapter(name)


def test_the_card_says_so_when_nothing_is_measured_yet():
    card = round_card({"round": 1, "adapter": "round-0001", "watermark": 5, "base_model": "b", "metrics": {}},
                      "me/x")
    assert "no arena votes yet" in card and "not measured" in card
