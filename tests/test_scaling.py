"""Beyond one process: a round trained data-parallel under a launcher.

On GPUs the launcher is ``accelerate launch --multi_gpu --num_processes N`` (or torchrun); here,
without GPUs, torchrun starts 2 CPU processes (gloo) running the same ``-m trainer.ipo SPEC``. Two
endpoints with an adapter swapped into both and one stopped: tests/test_endpoints.py.

    .venv/bin/python -m pytest tests/test_scaling.py
"""

import sys

from storage.votes import VoteStore
from tests.test_rounds import _seed_votes
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds


def test_a_round_under_a_launcher_trains_data_parallel_and_promotes(tmp_path, tiny_mistral_dir):
    """On the tiny Mistral: the launcher, the gloo group and rank 0's promotion are what is checked."""
    store = VoteStore(tmp_path / "votes.db")
    _seed_votes(store, 8)
    rounds = Rounds(store, tmp_path, str(tiny_mistral_dir))
    train = TrainConfig(epochs=1, max_length=64, learning_rate=5e-4, batch_size=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    progress = []
    manifest = rounds.run(RoundConfig(heldout_fraction=0.0, launcher=launcher, train=train),
                          on_progress=progress.append)
    assert manifest["status"] == "promoted", manifest["reason"]
    # 8 pairs, 2 per process, 2 processes: 2 optimiser steps (a single process takes 4)
    assert manifest["metrics"]["steps"] == 2
    assert [r["step"] for r in progress if "loss" in r] == [1, 2]  # rank 0 alone writes the metrics
    assert (rounds.adapters / manifest["adapter"] / "adapter_model.safetensors").is_file()
    assert not list(rounds.work.glob("*/adapter"))  # the promoted work dir is gone
