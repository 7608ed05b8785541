"""One IPO training run: TRL DPOTrainer(loss_type=["ipo", "sft"]) on a peft LoRA adapter (the
"sft" term, the chosen answers' NLL, at ``TrainConfig.sft_weight``; 0 leaves IPO alone).

Run as a subprocess by ``trainer.rounds`` (``python -m trainer.ipo SPEC.json``) so that a crash,
an OOM kill or a SIGKILL cannot take the app or a half-written adapter with it. Metrics go to
``metrics.jsonl`` (one line per logged step, then the held-out evaluation) in the work dir;
the result, ``result.json``, is written last.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.flags import setting
from storage.procs import die_with_parent
from trainer.data import CUT_COLUMNS

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Hyperparameters of one round; each field's help is its flag's (storage/flags.py).

    The defaults were chosen by measurement on the embedded model (docs/experiments.md, "round
    defaults"): beta 0.1 barely moved the policy in one round and a learning rate of 1e-3 made
    answers repeat themselves; the NLL term keeps probability on the chosen answers, which IPO
    alone lets fall with the rejected ones until answers repeat.
    """

    loss: str = setting("ipo", help="TRL loss type: ipo, or sigmoid for DPO with the same machinery",
                        choices=["ipo", "sigmoid"])
    beta: float = setting(0.5, help="IPO's beta (tau): the per-token log-ratio gap target is 1/(2*beta)")
    learning_rate: float = setting(3e-4, help="LoRA learning rate of a round from the base (the first, or "
                                   "--init fresh)")
    sft_weight: float = setting(0.2, help="weight of the chosen answers' NLL per token added to the preference "
                                "loss, as RPO does (0: the preference loss alone)")
    epochs: float = setting(2.0, help="passes over a round's training pairs")
    max_steps: int = setting(-1, help="stop after this many optimiser steps (-1: from --epochs)")
    batch_size: int = setting(4, help="pairs per optimiser step (per device)")
    grad_accum: int = setting(1, help="gradient accumulation steps")
    max_length: int = setting(512, help="prompt + answer tokens kept per sequence")
    lora_r: int = setting(16, help="LoRA rank of new adapters (at most the server's --max-lora-rank)")
    lora_alpha: int = setting(32, help="LoRA scaling numerator")
    lora_dropout: float = setting(0.0, help="dropout inside LoRA layers")
    quantize: str | None = setting(None, help="4bit: QLoRA (bitsandbytes nf4, CUDA or CPU)", choices=["4bit"])
    bf16: bool | None = setting(None, help="bf16 autocast (default: where the hardware has it: CUDA with bf16, "
                                "or a CPU with AVX512-BF16/AMX)")
    seed: int = setting(0, help="trainer seed")
    sample_prompts: list[str] = field(default_factory=list)  # for the degeneration check; set by the round
    fault: str | None = None  # test hook: "nan" forces a NaN loss

    def __post_init__(self) -> None:
        if self.loss not in ("ipo", "sigmoid"):
            raise ValueError(f"loss {self.loss!r}: use 'ipo' or 'sigmoid'")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.quantize not in (None, "4bit"):
            raise ValueError(f"quantize {self.quantize!r}: use '4bit' or leave it unset")


@dataclass
class TrainSpec:
    """What the worker subprocess is asked to do (written as SPEC.json)."""

    base_model: str
    work_dir: str
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    init_adapter: str | None = None
    config: TrainConfig = field(default_factory=TrainConfig)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> TrainSpec:
        d = json.loads(Path(path).read_text())
        d["config"] = TrainConfig(**d["config"])
        return cls(**d)


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        """Appends every log (TRL's loss, rewards/*, logps/*) to metrics.jsonl, flushed."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, "max_steps": state.max_steps, "time": time.time(), **logs}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    return JsonlMetrics()


def drop_turn_end(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """For each side flagged as cut, keep only the answer's own tokens from TRL's ``<side>_ids``
    (the answer followed by the chat template's turn end, e.g. ``<|im_end|>\n``): an answer cut at
    max_tokens never ended its turn, and training the turn end there would teach the model to stop
    mid-sentence (and, on the rejected side, push the end of turn down everywhere). The answer's
    tokens are found as a prefix (as is, or stripped as templates that trim render it); failing
    that, up to the last end-of-sequence token; failing that, left whole and counted."""
    unmatched = 0
    for side in ("chosen", "rejected"):
        if not example[f"{side}_cut"]:
            continue
        ids = example[f"{side}_ids"]
        message = example[side]
        content = message[-1]["content"] if isinstance(message, list) else message
        end = None
        for text in (content, content.strip()):
            own = tokenizer(text, add_special_tokens=False)["input_ids"]
            if own and ids[: len(own)] == own:
                end = len(own)
                break
        if end is None and tokenizer.eos_token_id in ids:
            end = len(ids) - 1 - ids[::-1].index(tokenizer.eos_token_id)
        if end is None:
            unmatched += 1
        else:
            example[f"{side}_ids"] = ids[:end]
    example["turn_end_unmatched"] = unmatched
    return example


def _trainer_class():
    """TRL's DPOTrainer plus the length-normalised metrics that IPO actually optimises.

    TRL's IPO loss regresses ``mean-per-token log-ratio(chosen) - (rejected)`` to 1/(2*beta), but its
    ``rewards/*`` metrics are built on token-summed log-ratios, so a length-driven preference can
    look right in one and wrong in the other. This subclass captures the per-token log-probs of
    the policy and reference forwards TRL already makes (a forward hook, no extra compute) and
    logs ``ipo/margin`` and ``ipo/accuracy`` on the per-token means, next to TRL's own metrics, and
    ``ipo/loss``, the IPO term alone (TRL's ``loss`` also holds the "sft" term when it is weighted in).
    """
    from trl import DPOTrainer

    class IPOTrainer(DPOTrainer):
        heldout_counts: dict[str, int]
        logprob_head = "trl fused"  # which LM head scores the labels: TRL's, or trainer.lm_head's

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.accelerator.device.type == "cpu":  # TRL's fused head is slow there (trainer.lm_head)
                from peft import PeftModel

                from trainer.lm_head import add_cpu_logprob_head

                outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks TRL's head for
                if self.use_weighting:
                    outputs += ("log_sum_sq_probs",)
                base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
                if add_cpu_logprob_head(base, outputs):
                    self.logprob_head = "labelled logits"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """TRL's tokenisation, then the turn end is taken off answers that were cut (trainer.data)."""
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not set(CUT_COLUMNS) <= set(dataset.column_names):
                return dataset
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = dataset.map(drop_turn_end, fn_kwargs={"tokenizer": tokenizer},
                                  desc=f"Leaving the turn end off cut answers in {dataset_name}")
            cut = sum(sum(dataset[c]) for c in CUT_COLUMNS)
            unmatched = sum(dataset["turn_end_unmatched"])
            logger.info("%s: %d cut answers trained without their turn end", dataset_name, cut - unmatched)
            if unmatched:
                logger.warning("%s: %d cut answers kept their turn end: the chat template's rendering of the "
                               "answer did not match the answer's own tokens", dataset_name, unmatched)
            return dataset

        def evaluate(self, *args, **kwargs):
            self.heldout_counts = {"per_token": 0, "summed": 0, "pairs": 0}
            return super().evaluate(*args, **kwargs)

        def _compute_loss(self, model, inputs, return_outputs):
            captured: list[Any] = []

            def hook(module, args, output):
                lp = getattr(output, "log_probs", None)
                if lp is not None:
                    captured.append(lp.detach())

            handle = model.register_forward_hook(hook)
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                handle.remove()
            if len(captured) >= 2:  # policy forward, then the reference forward (not precomputed)
                mode = "train" if self.model.training else "eval"
                mask = inputs["completion_mask"][..., 1:].to(captured[0].dtype)
                policy, ref = (c[:, -mask.size(1):] for c in captured[:2])
                per_token = ((policy - ref) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                chosen, rejected = per_token.chunk(2, dim=0)
                margin = (chosen - rejected).float()
                self._metrics[mode]["ipo/margin"].append(margin.mean().item())
                self._metrics[mode]["ipo/accuracy"].append((margin > 0).float().mean().item())
                if "ipo" in self.loss_types:  # the IPO term alone, when other losses are added to it
                    ipo = ((margin - 1 / (2 * self.beta)) ** 2).mean()
                    self._metrics[mode]["ipo/loss"].append(ipo.item())
                if mode == "eval":  # exact counts for the gate (batch means weigh a short last batch wrongly)
                    summed = ((policy - ref) * mask).sum(dim=1).float()
                    s_chosen, s_rejected = summed.chunk(2, dim=0)
                    self.heldout_counts["per_token"] += int((margin > 0).sum())
                    self.heldout_counts["summed"] += int((s_chosen > s_rejected).sum())
                    self.heldout_counts["pairs"] += margin.numel()
            return result

    return IPOTrainer


def _load_model(spec: TrainSpec):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = spec.config
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if (cuda and _bf16(cfg)) else torch.float32}
    if cfg.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if _bf16(cfg) else torch.float32,
        )
    if cuda:  # one whole model per process (a launcher's data-parallel worker uses its own GPU)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cuda)
    return model, tokenizer


def _bf16(cfg: TrainConfig) -> bool:
    import torch

    if cfg.bf16 is not None:
        return cfg.bf16
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """A CPU with native bf16 dot products (AVX512-BF16 or AMX): autocast to bf16 there trains a
    round 2-3x faster than fp32 (bench/round.py); without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(spec: TrainSpec) -> dict[str, Any]:
    """Train, evaluate on the held-out slice, sample a few answers; returns the result dict."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig

    from trainer.data import trl_rows

    cfg = spec.config
    work = Path(spec.work_dir)
    adapter_dir = work / "adapter"
    metrics_path = work / "metrics.jsonl"
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load_model(spec)

    peft_config = None
    if spec.init_adapter:
        # Iterative IPO: continue the serving adapter; TRL adds a frozen "ref" copy of it.
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
        )

    cuda = torch.cuda.is_available()
    losses = {cfg.loss: 1.0, "sft": cfg.sft_weight} if cfg.sft_weight else {cfg.loss: 1.0}
    args = DPOConfig(
        output_dir=str(work / "trl"),
        loss_type=list(losses),
        loss_weights=list(losses.values()),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        # TRL's defaults are GPU-minded (bf16, checkpointing, lr 1e-6): set each explicitly.
        bf16=_bf16(cfg),
        use_cpu=not cuda,
        gradient_checkpointing=cuda and cfg.quantize == "4bit",
        logging_steps=1,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the Trainer's default hides NaN losses from train_loss
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        lr_scheduler_type="constant",
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen=True,
    )
    train_ds = Dataset.from_list(trl_rows(spec.train))
    # Held-out accuracy means something only where the annotator had a preference: ties are
    # trained on (both orders) but left out of the evaluation, where they would pull it to 1/2.
    strict_heldout = [p for p in spec.heldout if p.get("choice") != "tie"]
    eval_ds = Dataset.from_list(trl_rows(strict_heldout)) if strict_heldout else None
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[_metrics_callback(metrics_path)],
    )
    if cfg.fault == "nan":
        _inject_nan(trainer.model)

    before = _lora_state(trainer.model)
    t0 = time.time()
    out = trainer.train()
    train_s = time.time() - t0
    after = _lora_state(trainer.model)
    changed = _changed_fraction(before, after)

    result: dict[str, Any] = {
        "train_loss": out.training_loss,
        "train_seconds": train_s,
        "steps": out.global_step,
        "train_pairs": len(spec.train),
        # answers cut at max_tokens, trained without the turn end they never produced (trainer.data)
        "cut_answers": sum(int(p.get("chosen_cut", False)) + int(p.get("rejected_cut", False)) for p in spec.train),
        "heldout_pairs": len(strict_heldout),
        "lora_changed_fraction": changed,
        "weights_finite": all(bool(torch.isfinite(t).all()) for t in after.values()),
        "seconds_per_step": train_s / max(1, out.global_step),
        "tokens_per_second": trainer.state.num_input_tokens_seen / train_s if train_s else 0.0,
        "peak_rss_mb": _peak_rss_mb(),
        "logprob_head": trainer.logprob_head,
        # what the base was loaded as: "4bit" (bitsandbytes nf4, QLoRA) or the float dtype
        "base_precision": "4bit" if getattr(model, "is_loaded_in_4bit", False) else str(
            next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch."),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if eval_ds is not None:
        ev = trainer.evaluate()  # on every process: it gathers across them
        result.update({k: v for k, v in ev.items() if isinstance(v, int | float)})
        counts = trainer.heldout_counts
        if counts["pairs"] == len(strict_heldout):  # one process saw every pair (not sharded)
            result["heldout_correct"] = counts["per_token"] if cfg.loss == "ipo" else counts["summed"]
    if not is_main_process():
        return result  # rank 0 saves, samples and writes the result
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    # peft nests a non-"default" selection in a subfolder; "default" lands at the top.
    if result["weights_finite"]:  # a diverged adapter is refused anyway; sampling it would crash
        # The gate's generations in the precision the round trained in (2x faster on a bf16 CPU).
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=_bf16(cfg)):
            result.update(_kl_estimate(trainer.model, tokenizer, cfg.sample_prompts, seed=cfg.seed))
            result["samples"] = _samples(trainer.model, tokenizer, cfg.sample_prompts)
            with trainer.model.disable_adapter():  # the base, for the degeneration gate's comparison
                result["base_samples"] = _samples(trainer.model, tokenizer, cfg.sample_prompts)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "result", **{k: v for k, v in result.items() if "samples" not in k}}) + "\n")
    (work / "result.json").write_text(json.dumps(result))
    return result


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _lora_state(model) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


def _changed_fraction(before: dict[str, Any], after: dict[str, Any]) -> float:
    if not before:
        return 0.0
    changed = sum(1 for n, p in before.items() if not (p == after[n]).all())
    return changed / len(before)


def _inject_nan(model) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n and ".default." in n:
                p.fill_(float("nan"))
                return


def _encode(tokenizer, prompts: list[str], device):
    """User turns through the chat template, left-padded into one batch for ``generate``: on a
    CPU one batched call costs about what a single prompt does (decoding is latency-bound)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer.apply_chat_template(
            [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True, padding=True,
            return_tensors="pt", return_dict=True,
        ).to(device)
    finally:
        tokenizer.padding_side = side


def _samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers from the trained policy, for the degeneration gate."""
    import torch

    if not prompts:
        return []
    model.eval()
    ids = _encode(tokenizer, prompts, model.device)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(gen[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _answer_logps(model, seqs, mask, prompt_len: int):
    """Per-token log-probs of ``seqs[:, prompt_len:]`` under ``model`` (its active adapter). Rows
    are left-padded: ``mask`` hides the padding and positions count from each row's first token."""
    import torch

    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, prompt_len - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


def _kl_estimate(model, tokenizer, prompts: list[str], samples_per_prompt: int = 2,
                 max_new_tokens: int = 48, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo KL(policy || reference) on answers sampled from the policy (temperature 1):
    the mean over answers of sum_t log pi(y_t) - log pi_ref(y_t). The reference is the one the
    round trained against: the "ref" adapter in iterative rounds, the base otherwise."""
    import torch
    from trl.trainer.utils import use_adapter

    if not prompts:
        return {}
    model.eval()
    ref_name = "ref" if "ref" in getattr(model, "peft_config", {}) else None
    torch.manual_seed(seed)
    ids = _encode(tokenizer, prompts, model.device)
    n = ids["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, num_return_sequences=samples_per_prompt,
                             pad_token_id=tokenizer.pad_token_id)
        answer = gen[:, n:]
        answer_mask = (answer != tokenizer.pad_token_id).long()
        if tokenizer.pad_token_id == tokenizer.eos_token_id:  # keep the first EOS: it was sampled
            answer_mask = torch.cat([torch.ones_like(answer_mask[:, :1]), answer_mask[:, :-1]], dim=1)
        prompt_mask = ids["attention_mask"].repeat_interleave(samples_per_prompt, dim=0)
        mask = torch.cat([prompt_mask, answer_mask], dim=1)
        policy = _answer_logps(model, gen, mask, n)
        with use_adapter(model, ref_name):
            ref = _answer_logps(model, gen, mask, n)
    per_answer = ((policy - ref) * answer_mask).sum(dim=1).tolist()
    tokens = int(answer_mask.sum())
    kl = sum(per_answer) / len(per_answer)
    return {"kl_estimate": kl, "kl_per_token": sum(per_answer) / max(1, tokens), "kl_answers": len(per_answer)}


def is_main_process() -> bool:
    """Rank 0 under a launcher (accelerate, torchrun), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "LOCAL_RANK" in os.environ:  # a launcher's worker: die with the launcher
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = TrainSpec.load(Path(argv[0]))
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
