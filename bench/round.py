"""Seconds per step, tokens per second and peak memory of one IPO round.

    .venv/bin/python bench/round.py                       # embedded SmolLM2 on CPU
    .venv/bin/python bench/round.py --pairs 64 --max-length 512
    .venv/bin/python bench/round.py --quantize both       # 16-bit, then QLoRA (nf4), side by side
    python bench/round.py --mistral-7b-shaped --quantize both --pairs 1000 --max-length 512   # CUDA

--mistral-7b-shaped builds a randomly initialised Mistral-7B-shaped model (no download) for speed
figures on a GPU; MFU is reported against --peak-tflops (default: H100 SXM dense bf16, 989).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from common import embedded_model

from storage.flags import add_flags, from_flags, parse
from storage.votes import VoteStore
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds


def synthetic_votes(store: VoteStore, n: int, words: int) -> None:
    rng = random.Random(0)
    vocab = "the a model answer short long list point idea note clear simple brief detail".split()
    for i in range(n):
        text = f"Question {i}: " + " ".join(rng.choice(vocab) for _ in range(12))
        long = " ".join(rng.choice(vocab) for _ in range(words))
        short = " ".join(rng.choice(vocab) for _ in range(max(4, words // 4)))
        pid = store.issue_pair(annotator="bench", prompt_id=store.prompt_id(text),
                               messages=[{"role": "user", "content": text}], answer_left=short, answer_right=long,
                               model_left="base", model_right="base", seed=i, params={}, timings={})
        store.record_vote(pid, "bench", "left")


def mistral_7b_shaped(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    if (out / "config.json").exists():
        return out
    # Any tokenizer with a chat template will do (no download): SmolLM2's. The vocabulary follows it
    # (49,152 rather than Mistral's 32,768: about 1% more FLOPs per token), so every id is valid.
    tok = AutoTokenizer.from_pretrained(embedded_model(out.parent))
    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=32768,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--words", type=int, default=60, help="words in the longer answer")
    add_flags(p, TrainConfig, only=["max_length", "batch_size", "epochs", "lora_r", "learning_rate", "beta"])
    p.set_defaults(max_length=256, epochs=1.0)  # the bench's round: one pass over short synthetic pairs
    p.add_argument("--quantize", dest="quantize_mode", choices=["none", "4bit", "both"], default="none",
                   help="both: a 16-bit round, then a QLoRA (nf4) round on the same pairs, side by side")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has it (CUDA, AVX512-BF16/AMX CPUs)")
    p.add_argument("--mistral-7b-shaped", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefloop-bench")
    args = parse(p)
    model = mistral_7b_shaped(args.data_dir / "mistral-7b-shaped") if args.mistral_7b_shaped \
        else embedded_model(args.data_dir)
    rows = []
    for quantize in (["none", "4bit"] if args.quantize_mode == "both" else [args.quantize_mode]):
        rows.append((quantize, *one_round(args, model, None if quantize == "none" else "4bit")))
    if len(rows) > 1:
        print("\n| base weights | s/step | tokens/s | peak RSS (MB) | peak CUDA (MB) | train loss |")
        print("| --- | --- | --- | --- | --- | --- |")
        for quantize, r, _ in rows:
            print(f"| {'nf4 (QLoRA)' if quantize == '4bit' else '16-bit'} | {r['seconds_per_step']:.2f} | "
                  f"{r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} | {r.get('peak_cuda_mb', 0):.0f} | "
                  f"{r['train_loss']:.3f} |")


def one_round(args, model: Path, quantize: str | None) -> tuple[dict, float]:
    work = Path(tempfile.mkdtemp(prefix="round-bench-"))
    store = VoteStore(work / "votes.db")
    synthetic_votes(store, args.pairs, args.words)
    rounds = Rounds(store, work, str(model))
    # One synthetic annotator: no per-person cap (it would hold back all but 25%).
    cfg = RoundConfig(heldout_fraction=0.0, sample_prompts=1, min_distinct_2=0.0, max_distinct_2_drop=1.0,
                      max_share=1.0,
                      train=from_flags(TrainConfig, args, quantize=quantize,
                                       bf16={"auto": None, "bf16": True, "fp32": False}[args.precision]))
    t0 = time.time()
    m = rounds.run(cfg)
    wall = time.time() - t0
    r = m["metrics"]
    print(json.dumps({k: r.get(k) for k in ("base_precision", "steps", "seconds_per_step", "tokens_per_second",
                                            "peak_rss_mb", "peak_cuda_mb", "train_seconds", "train_loss")}, indent=1))
    print(f"round wall time (load, train, samples, promote): {wall:.0f} s; verdict {m['status']}")
    if args.mistral_7b_shaped and r.get("tokens_per_second"):
        params = 7.24e9
        # Forward + backward through a LoRA model ~ 3 x 2 x params FLOPs per policy token; IPO's
        # reference pass (adapter disabled) adds one more forward: ~8 x params per token.
        tflops = 8 * params * r["tokens_per_second"] / 1e12
        print(f"~{tflops:.0f} TFLOP/s, MFU {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g}")
    return r, wall


if __name__ == "__main__":
    main()
