"""Rounds that must not promote: a forced NaN, a failed gate, a full disk, a trainer killed mid-round.
Each leaves the serving adapter unchanged and records why.

    .venv/bin/python -m pytest tests/test_trainer_faults.py
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from storage.serving import ServingLog
from storage.votes import VoteStore
from tests.conftest import ROOT
from tests.test_rounds import _seed_votes
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds

SMALL = dict(epochs=1, max_length=96, learning_rate=5e-4)


def _data(tmp_path, base):
    store = VoteStore(tmp_path / "votes.db")
    _seed_votes(store, 8)
    ServingLog(store).set_base_model(str(base))
    ServingLog(store).record([])
    return tmp_path, store, Rounds(store, tmp_path, str(base))


@pytest.fixture
def data(tmp_path, tiny_mistral_dir):
    """Rounds on the tiny Mistral: what these faults check is the round's lifecycle (training,
    the gate, promotion are all real), and its gate samples take a second instead of twenty."""
    return _data(tmp_path, tiny_mistral_dir)


@pytest.fixture
def smol_data(tmp_path, smollm2_dir):
    """Rounds on SmolLM2, whose steps take long enough to kill a round between two of them."""
    return _data(tmp_path, smollm2_dir)


def _nothing_promoted(rounds: Rounds, store: VoteStore) -> None:
    assert rounds.promoted() == []
    assert not [p for p in rounds.adapters.iterdir() if p.name.startswith("round-")]
    assert ServingLog(store).history() == []


def test_a_nan_loss_is_not_promoted(data):
    _, store, rounds = data
    m = rounds.run(RoundConfig(heldout_fraction=0.0, train=TrainConfig(fault="nan", **SMALL)))
    assert m["status"] == "rejected"
    assert "nan" in m["reason"].lower()
    _nothing_promoted(rounds, store)


def test_a_failed_gate_is_not_promoted_and_says_why(data):
    _, store, rounds = data
    m = rounds.run(RoundConfig(heldout_fraction=0.5, min_heldout_accuracy=1.01,
                               train=TrainConfig(**SMALL)))
    assert m["status"] == "rejected"
    assert "floor 1.01)" in m["reason"] and "below the floor" in m["reason"]
    met = m["metrics"]  # exact held-out counts, from the evaluation's own forwards
    assert met["heldout_pairs"] > 0 and 0 <= met["heldout_correct"] <= met["heldout_pairs"]
    assert met["heldout_accuracy"] == met["heldout_correct"] / met["heldout_pairs"]
    assert rounds.all_rounds()[-1]["status"] == "rejected"
    _nothing_promoted(rounds, store)


def test_a_full_disk_at_promotion_fails_the_round_and_leaves_nothing_half_written(data, monkeypatch):
    """The disk fills while the adapter is being written. A fake: a full filesystem cannot be
    made here without root, so the fsync of the copied adapter raises ENOSPC as the kernel would;
    the training, the copy and everything around them are real."""
    import errno

    import trainer.rounds

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    _, store, rounds = data
    monkeypatch.setattr(trainer.rounds, "fsync_tree", full)
    m = rounds.run(RoundConfig(heldout_fraction=0.0, train=TrainConfig(**SMALL)))
    assert m["status"] == "failed"
    assert "could not write the adapter" in m["reason"] and "No space left on device" in m["reason"]
    assert rounds.all_rounds()[-1]["status"] == "failed"
    assert not list(rounds.adapters.iterdir())  # no half-written copy either
    _nothing_promoted(rounds, store)


def test_sigkill_mid_round_leaves_no_adapter_no_orphan_and_a_failed_round(smol_data):
    import psutil

    tmp, store, rounds = smol_data
    cli = subprocess.Popen([sys.executable, "-m", "trainer", "--data-dir", str(tmp), "round", "--epochs", "3",
                            "--max-length", "96", "--heldout-fraction", "0"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    metrics = None
    while time.monotonic() < deadline and cli.poll() is None:
        found = list((tmp / "work").glob("round-*/metrics.jsonl"))
        if found and found[0].stat().st_size > 0:
            metrics = found[0]
            break
        time.sleep(0.5)
    assert metrics is not None, cli.stdout.read().decode()[-2000:]
    trainer = [c for c in psutil.Process(cli.pid).children(recursive=True) if "trainer.ipo" in " ".join(c.cmdline())]
    assert trainer, "the training subprocess should be running"
    cli.send_signal(signal.SIGKILL)  # the CLI dies mid-round...
    cli.wait()
    trainer[0].wait(timeout=30)  # ...and its training child with it (no orphan keeps computing)
    r = subprocess.run([sys.executable, "-m", "trainer", "--data-dir", str(tmp), "status", "--json"],
                       cwd=ROOT, capture_output=True, text=True)
    status = json.loads(r.stdout)
    assert status["rounds"][-1]["status"] == "failed"
    assert "died" in status["rounds"][-1]["reason"]
    _nothing_promoted(rounds, store)
    assert not list(rounds.adapters.glob("*.tmp-*"))
    # The lock is free again: the next round runs (one step; no gate samples, which are not what
    # this checks and take longer than the step on SmolLM2).
    again = subprocess.run([sys.executable, "-m", "trainer", "--data-dir", str(tmp), "round", "--epochs", "1",
                            "--max-length", "96", "--heldout-fraction", "0", "--max-steps", "1",
                            "--sample-prompts", "0"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "promoted" in again.stdout
    assert [r["adapter"] for r in rounds.promoted()] == ["round-0002"]
