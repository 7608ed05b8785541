"""QLoRA rounds (bitsandbytes nf4) run on the CPU too: the tiny Mistral here, the embedded model
through the app in tests/test_space.py (the open-annotation round trains in 4 bits).

    .venv/bin/python -m pytest tests/test_qlora.py
"""

import json

from collector.sampling import SamplingParams, sample_pair
from storage.votes import VoteStore
from tests.test_rounds import _seed_votes
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds


def test_a_qlora_round_on_the_tiny_mistral_learns_and_its_adapter_serves_in_vllm(tiny_mistral_dir, tiny_engine,
                                                                                 tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    _seed_votes(store, 8)
    rounds = Rounds(store, tmp_path, str(tiny_mistral_dir))
    # A random model's greedy samples repeat themselves: the degeneration gate has nothing to judge here.
    cfg = RoundConfig(heldout_fraction=0.0, min_distinct_2=0.0, max_distinct_2_drop=1.0,
                      train=TrainConfig(quantize="4bit", beta=0.1, epochs=3, learning_rate=1e-3, max_length=128))
    progress: list[dict] = []
    manifest = rounds.run(cfg, on_progress=progress.append)
    assert manifest["status"] == "promoted", manifest["reason"]
    metrics = manifest["metrics"]
    assert metrics["base_precision"] == "4bit"  # the base really was loaded in nf4
    steps = [r for r in progress if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert metrics["lora_changed_fraction"] == 1.0 and metrics["samples"]  # the gate ran on real samples
    adapter = rounds.adapters / manifest["adapter"]
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    tiny_engine.load_adapter("qlora-0001", adapter)
    pair = sample_pair(tiny_engine, [{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=8),
                       seed=1, model="qlora-0001")
    assert pair.models == ("qlora-0001", "qlora-0001") and pair.answers[0]
