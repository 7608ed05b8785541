"""Helpers shared by the benchmarks: the embedded model and a LoRA adapter shaped like a round's."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Give me three tips for staying focused while working from home.",
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "How do I make a good cup of tea?",
    "What is the difference between a list and a tuple in Python?",
    "Plan a one-day trip to a city you like.",
    "How can I save money on groceries each week?",
    "Explain recursion to a beginner.",
]


def embedded_model(data_dir: Path) -> Path:
    from collector.models import ensure_embedded

    return ensure_embedded(data_dir / "models")


def bench_model(spec: str, data_dir: Path) -> Path:
    """The model a bench runs on: "embedded" (SmolLM2-135M), "mistral-7b-shape" (Mistral-7B's shape
    with random bf16 weights and SmolLM2's tokenizer, written once under ``data_dir``: a GPU
    measurement that needs no Hub), or a local folder."""
    if spec == "embedded":
        return embedded_model(data_dir)
    if spec != "mistral-7b-shape":
        return Path(spec)
    out = data_dir / "models" / "mistral-7b-shape"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_model(data_dir))
    config = MistralConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None,
                           torch_dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MistralForCausalLM(config)  # about 14.5 GB in bf16
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    return out


def big(model: Path) -> bool:
    """Over 2 GB of weights (loaded in bf16 here, not float32)."""
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) > 2e9


def round_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A LoRA adapter like a round produces (rank r on all 7 projections), random nonzero weights."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.ipo import LORA_TARGETS

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if big(base) else torch.float32),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, init_lora_weights=False,
                   task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)  # small: changes the output without wrecking the language
    model.save_pretrained(out)
    return out


def start_app(data_dir: Path, model: Path, url: str, api_key: str, users: list[str], extra: list[str] | None = None,
              timeout: float = 300):
    """`python app.py` attached to a running vLLM, users ``name:name-pw``; returns (process, app url)."""
    import os
    import subprocess
    import time

    import httpx

    from collector.engine import free_port

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "users.txt").write_text("".join(f"{u}:{u}-pw\n" for u in users))
    port = free_port()
    log = data_dir / "app.out"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(port),
         "--users", str(data_dir / "users.txt"), "--admins", users[0], "--model", str(model), "--vllm-url", url,
         "--vllm-api-key", api_key, "--round-every-votes", "0", "--pairs-per-minute", "0", "--repeat-rate", "0",
         *(extra or [])],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    app_url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while "Press Ctrl-C to stop." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    httpx.get(app_url, timeout=10)
    return proc, app_url


class Session:
    """A logged-in person calling named endpoints through Gradio's queue with one session, as a
    browser tab or a ``gradio_client.Client`` does (one session for all its calls)."""

    def __init__(self, app_url: str, user: str):
        import secrets

        import httpx

        self.http = httpx.Client(base_url=app_url, timeout=600)
        r = self.http.post("login", data={"username": user, "password": f"{user}-pw"})
        r.raise_for_status()
        config = self.http.get("config").json()
        self.fns = {d.get("api_name"): i for i, d in enumerate(config["dependencies"]) if d.get("api_name")}
        self.session = secrets.token_hex(8)

    def call(self, api: str, data: list) -> tuple[str, object]:
        """("complete", output) or ("error", message)."""
        import json

        r = self.http.post("gradio_api/queue/join", json={"data": data, "fn_index": self.fns[api],
                                                           "session_hash": self.session, "event_data": None,
                                                           "trigger_id": None})
        if r.status_code != 200:
            return "error", r.text
        event = r.json()["event_id"]
        with self.http.stream("GET", f"gradio_api/queue/data?session_hash={self.session}") as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event):
                    continue
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    if msg.get("success"):
                        return "complete", (out.get("data") or [None])[0]
                    return "error", out.get("error") or out
                if msg.get("msg") in ("unexpected_error", "close_stream"):
                    return "error", msg
        return "error", "stream ended without an answer"


def logged_in(app_url: str, user: str) -> Session:
    return Session(app_url, user)


def call(session: Session, api: str, data: list) -> tuple[str, object]:
    return session.call(api, data)
