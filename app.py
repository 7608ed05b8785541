"""PrefLoop: collect human preferences between two answers and turn them into a better model.

    python app.py                                   # embedded SmolLM2 on CPU, or Mistral-7B on CUDA
    python app.py --model ./my-model --users users.txt --admins alice
    python app.py --vllm-url http://127.0.0.1:8000 --vllm-url http://127.0.0.1:8001
    python app.py hash-password                     # a hashed line for the users file

Composition root: read flags and environment, build the services, build the Gradio Blocks,
launch, and stop everything on Ctrl-C or SIGTERM. No business logic lives here.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("prefloop")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a private annotation app
# Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event by default:
# a cost that grows with traffic and, on 2 cores, a third of a vote's server time. Every 1,000
# events over the last 1,000 is plenty for the API page's timing figures.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

ENV_DATA_DIR = "PREFLOOP_DATA_DIR"
SPACE_PERSISTENT = Path("/data")  # a Space's persistent storage, when the Space has it


def default_data_dir(env: dict[str, str] | None = None, persistent: Path = SPACE_PERSISTENT) -> Path:
    """$PREFLOOP_DATA_DIR; on a Space with persistent storage, /data/prefloop (it survives restarts
    and rebuilds); else ./data."""
    env = os.environ if env is None else env
    if env.get(ENV_DATA_DIR):
        return Path(env[ENV_DATA_DIR])
    if env.get("SPACE_ID") and persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / "prefloop"
    return Path("data")


def auth_mode(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    """"hf" (Sign in with Hugging Face) or "password" (the users file); "auto" picks hf on a Space
    with OAuth enabled."""
    from collector.users import on_space_with_oauth

    if args.auth != "auto":
        return args.auth
    return "hf" if on_space_with_oauth(env) else "password"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from collector.annotate import AnnotateConfig  # light at import (no torch): the settings live there
    from collector.sampling import SamplingParams
    from storage.flags import add_flags, parse
    from trainer.ipo import TrainConfig
    from trainer.rounds import RoundConfig
    from trainer.schedule import ScheduleConfig

    p = argparse.ArgumentParser(
        prog="python app.py",
        description="PrefLoop: annotators compare two answers from the serving model; IPO rounds on "
        "their votes train a LoRA adapter that is hot-swapped into vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=["serve", "hash-password"], default="serve",
                   help="serve the app, or print a hashed password line for the users file")
    g = p.add_argument_group("model and serving")
    g.add_argument("--model", default=None,
                   help="base model: 'embedded' (SmolLM2-135M-Instruct, offline), a local Hugging Face "
                   "folder, or a Hub id. Default: embedded without CUDA, mistralai/Mistral-7B-Instruct-v0.2 with CUDA")
    g.add_argument("--vllm-url", action="append", default=[], metavar="URL",
                   help="attach to a running vLLM server instead of starting one (repeat for several)")
    g.add_argument("--vllm-api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="API key of attached vLLM servers (env VLLM_API_KEY)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA rank vLLM accepts")
    g.add_argument("--serving", choices=["auto", "merged", "lora"], default=os.environ.get("PREFLOOP_SERVING", "auto"),
                   help="merged: the served version's adapter is merged into the base and reloaded in place, so pairs "
                   "run at the base model's speed (arena opponents as LoRA deltas); lora: it is served as an adapter. "
                   "auto: merged for the vLLM server PrefLoop starts, lora for --vllm-url servers "
                   "(env PREFLOOP_SERVING)")
    g.add_argument("--max-model-len", type=int, default=2048, help="vLLM context length")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory vLLM may take (CUDA only). Default: from the card's size, leaving "
                   "room for a round's trainer (collector/gpu.py)")
    g.add_argument("--vllm-quantization", default=None,
                   help="vLLM --quantization for the served base (CUDA), e.g. bitsandbytes. Default: 4-bit on "
                   "cards under 40 GiB, else none")
    add_flags(g, SamplingParams, only=["max_tokens", "temperature"])
    g.add_argument("--vllm-args", default=os.environ.get("PREFLOOP_VLLM_ARGS", ""),
                   help='more flags for the managed vLLM server, e.g. "--tensor-parallel-size 2" to shard a model '
                   "over 2 GPUs (env PREFLOOP_VLLM_ARGS)")
    g = p.add_argument_group("app")
    g.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help=f"votes, models, adapters, rounds and logs (env {ENV_DATA_DIR}; on a Space with "
                   "persistent storage, /data/prefloop)")
    g.add_argument("--host", default="127.0.0.1", help="address the web app listens on (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)), help="web app port (env PORT)")
    g.add_argument("--users", type=Path, default=None,
                   help="users file, lines 'name:password' (or a hash from `hash-password`). "
                   "Default: <data-dir>/users.txt, created on first run with a random admin password")
    g.add_argument("--auth", choices=["auto", "password", "hf"], default=os.environ.get("PREFLOOP_AUTH", "auto"),
                   help="password: the users file; hf: Sign in with Hugging Face (a Space with hf_oauth: true); "
                   "auto: hf on such a Space, else password (env PREFLOOP_AUTH)")
    g.add_argument("--admins", default=os.environ.get("PREFLOOP_ADMINS"),
                   help="comma-separated admin names (env PREFLOOP_ADMINS). Default: the first user of the users "
                   "file; with --auth hf, the Space's owner (SPACE_AUTHOR_NAME)")
    g.add_argument("--annotators", default=os.environ.get("PREFLOOP_ANNOTATORS"),
                   help="with --auth hf: who may annotate: 'open' (anyone signed in), or a comma-separated list of "
                   "Hugging Face user names and org:NAME entries (members of that organisation). Default: the admins "
                   "only. With --auth password the users file is the list (env PREFLOOP_ANNOTATORS)")
    g.add_argument("--prompts", default=None,
                   help="prompts: a file (.txt one per line, .jsonl with 'prompt'), or a dataset (.parquet/.json/.csv "
                   "file or Hub id) with --prompts-column. Default: the bundled 211 prompts")
    g.add_argument("--guidelines", type=Path, default=os.environ.get("PREFLOOP_GUIDELINES"), metavar="FILE.md",
                   help="what 'better' means here, in Markdown: shown above each pair (open until a person has "
                   "voted under this version), stored by version with each vote and in the dataset card "
                   "(env PREFLOOP_GUIDELINES)")
    g.add_argument("--prompts-column", default="prompt", help="the dataset column with the prompts (text or messages)")
    g.add_argument("--prompts-split", default="train", help="the dataset split to read prompts from")
    add_flags(g, AnnotateConfig, exclude=("max_prompt_chars",))
    g = p.add_argument_group("rounds")
    add_flags(g, ScheduleConfig)
    add_flags(g, TrainConfig, only=["beta", "learning_rate", "sft_weight", "epochs", "lora_r"])
    add_flags(g, RoundConfig, only=["continue_learning_rate", "max_share", "launcher"])
    # Policies the app resolves from its context (who may annotate; the GPU plan), under their own
    # names so that they never pass for RoundConfig.promote or TrainConfig.quantize:
    g.add_argument("--promote", dest="promote_mode", choices=["auto", "manual"], default=None,
                   help="auto: a round that passes the gate is served at once; manual: it waits for an admin in the "
                   "Admin tab. Default: manual when --annotators is open, else auto")
    g.add_argument("--quantize", dest="quantize_mode", choices=["auto", "none", "4bit"], default="auto",
                   help="rounds with QLoRA (4bit) or not; auto: QLoRA on CUDA cards under 70 GiB, none on CPU")
    g = p.add_argument_group("Hub dataset")
    g.add_argument("--hub-dataset", default=os.environ.get("PREFLOOP_HUB_DATASET"), metavar="REPO",
                   help="push votes to this dataset repo (needs HF_TOKEN; private; env PREFLOOP_HUB_DATASET)")
    g.add_argument("--hub-every-minutes", type=float, default=5.0, help="how often new votes are pushed")
    g = p.add_argument_group("Hub model")
    g.add_argument("--hub-model", default=os.environ.get("PREFLOOP_HUB_MODEL"), metavar="REPO",
                   help="publish each promoted adapter to this model repo, one folder, commit and tag per round "
                   "(needs HF_TOKEN; private; env PREFLOOP_HUB_MODEL)")
    g.add_argument("--adapters-from-hub", action="store_true",
                   help="the attached vLLM servers (--vllm-url) load adapters from --hub-model themselves, so they "
                   "need no shared filesystem (start them with PrefLoop installed and PREFLOOP_HUB_ADAPTERS=REPO)")
    g.add_argument("--log-level", default="INFO", help="logging level")
    args = parse(p, argv)
    if args.adapters_from_hub and not (args.hub_model and args.vllm_url):
        p.error("--adapters-from-hub needs --hub-model (where the adapters are published) and --vllm-url (the "
                "servers that load them)")
    if args.serving == "merged" and args.adapters_from_hub:
        p.error("--serving merged needs the servers to read the app's merged weights; with --adapters-from-hub "
                "use --serving lora")
    if args.lora_r > args.max_lora_rank:
        p.error(f"--lora-r {args.lora_r} exceeds --max-lora-rank {args.max_lora_rank}: "
                "vLLM would refuse the adapters")
    return args


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


def server_lora_rank(max_rank: int, mode: str) -> int:
    """The server's --max-lora-rank: merged serving's arena deltas stack two adapters (rank 2r)."""
    need = 2 * max_rank if mode == "merged" else max_rank
    return next((r for r in VLLM_LORA_RANKS if r >= need), need)


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f"port {port} on {host} is in use or not allowed ({e.strerror}); pass --port with a free port"
            ) from None


def setup_logging(level: str, data_dir: Path) -> None:
    """Log to stderr and to <data-dir>/logs/app.log (0600; rotated at 20 MiB, 5 kept)."""
    from logging.handlers import RotatingFileHandler

    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = data_dir / "logs" / "app.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[
        logging.StreamHandler(), RotatingFileHandler(path, maxBytes=20 * 2**20, backupCount=5)])
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def skip_spaces_hot_reload() -> None:
    """On a Space, gradio starts a hot-reload watcher for the Gradio SDK's dev mode. It needs the
    `spaces` package; without it the watcher thread dies with a RuntimeError traceback in the
    Space's log although the app serves normally. PrefLoop is a Docker Space and does not hot-reload,
    so the watcher is made a no-op there (gradio is pinned; if the hook moves, nothing is patched
    and the harmless traceback comes back)."""
    import importlib.util

    import gradio.http_server as hs
    from gradio.utils import get_space

    if get_space() is not None and importlib.util.find_spec("spaces") is None and hasattr(hs, "watchfn_spaces"):
        hs.watchfn_spaces = lambda reloader: None


@dataclass
class App:
    """The running services, so that shutdown can stop them in order."""

    demo: object
    engine: object
    scheduler: object
    hub: object
    url: str


def build(args: argparse.Namespace) -> App:
    import gradio as gr

    from collector.annotate import AnnotateConfig, Annotation
    from collector.engine import Engine, EngineConfig
    from collector.gpu import ModelShape, cuda_total_gib, plan_for
    from collector.judge import ENDPOINT_FILE
    from collector.models import resolve_model
    from collector.prompts import PromptQueue
    from collector.sampling import SamplingParams
    from collector.serving import Serving
    from collector.users import Access, Users, UsersError, space_oauth_missing, write_private
    from storage.flags import from_flags
    from storage.serving import ServingLog
    from storage.votes import VoteStore
    from trainer.ipo import TrainConfig
    from trainer.rounds import RoundConfig, Rounds
    from trainer.schedule import ScheduleConfig, Scheduler
    from ui import admin, annotate

    data_dir = args.data_dir.resolve()
    # Cheap checks first: a bad users file or a busy port should not wait for vLLM.
    mode = auth_mode(args)
    password, users = None, None
    users_path = args.users or data_dir / "users.txt"
    if mode == "hf":
        missing = space_oauth_missing()
        if missing:
            raise UsersError(f"--auth hf runs only on a Hugging Face Space with `hf_oauth: true` in its README; "
                             f"missing here: {', '.join(missing)}. Elsewhere use --auth password")
        admins = space_admins(args.admins)
    else:
        if args.users is None and not users_path.exists():
            users, password = Users.generate(users_path)
        else:
            users = Users.load(users_path)
        admins = {a.strip() for a in args.admins.split(",")} if args.admins else {next(iter(users.hashes))}
    check_port(args.host, args.port)
    guidelines = read_guidelines(args.guidelines)
    store = VoteStore(data_dir / "votes.db", check=True)
    hub = make_hub(args, store, data_dir)
    queue = PromptQueue(store)
    queue.load(args.prompts, args.prompts_column, args.prompts_split)
    access = Access(mode, store, admins, args.annotators, users=users)

    model = resolve_model(args.model, data_dir)
    ServingLog(store).set_base_model(model)  # the trainer CLI trains on what the app serves
    total_gib = cuda_total_gib()
    plan = None
    if total_gib is not None:  # the split of the card, from the model's own shape
        plan = plan_for(total_gib, ModelShape.from_folder(model, args.max_model_len), serve_here=not args.vllm_url)
    if plan is not None:
        logger.info("GPU plan: %s", plan.note)
    quantized = args.vllm_quantization or (plan and plan.vllm_quantization)
    # auto: merged for the managed server, except over quantized weights (a merged bf16 model
    # reloaded into bitsandbytes layers is untested), and lora for attached servers
    serving_mode = args.serving if args.serving != "auto" else ("lora" if args.vllm_url or quantized else "merged")
    if args.vllm_url:
        engine = Engine.attach(args.vllm_url, args.vllm_api_key,
                               hub_repo=args.hub_model if args.adapters_from_hub else None)
    else:
        engine = Engine.launch(EngineConfig(
            model=model, max_lora_rank=server_lora_rank(args.max_lora_rank, serving_mode),
            max_model_len=args.max_model_len, weight_reload=serving_mode == "merged",
            gpu_memory_utilization=args.gpu_memory_utilization or (plan and plan.gpu_memory_utilization),
            quantization=quantized,
            extra_args=shlex.split(args.vllm_args), log_path=data_dir / "logs" / "vllm.log",
            pid_file=data_dir / "vllm.pid", niceness=10 if total_gib is None else 0))
        # where scripts on this machine (the judge: `--judge-url data/vllm-endpoint.json`) reach the
        # managed server; readable by the operator only, like the vote log
        ep = engine.endpoints[0]
        write_private(data_dir / ENDPOINT_FILE, json.dumps({"url": f"{ep.url}/v1", "api_key": ep.api_key}))
    try:
        if serving_mode == "merged":
            engine.check_reload()
        serving = Serving(engine, store, data_dir / "adapters", model, args.max_lora_rank, mode=serving_mode,
                          merged_dir=data_dir / "merged")
        logger.info("serving mode: %s", serving_mode)
        rounds = Rounds(store, data_dir, model)
        rounds.cleanup()
        serving.restore()
        engine.start_watchdog()
        quantize = {"none": None, "4bit": "4bit"}.get(args.quantize_mode, plan.trainer_quantize if plan else None)
        promote = args.promote_mode or ("manual" if access.open else "auto")
        round_cfg = from_flags(RoundConfig, args, promote=promote,
                               train=from_flags(TrainConfig, args, quantize=quantize))
        publisher = make_publisher(args, store, rounds, hub)

        def promoted(names: list[str]) -> None:
            """A new promoted round: publish it (first, when the servers load adapters from the Hub), serve it."""
            if publisher is not None and publisher.unpublished():
                admin.publish_pending(publisher, store, hub)
            serving.sync(names)

        scheduler = Scheduler(
            rounds, round_cfg,
            from_flags(ScheduleConfig, args),
            on_promoted=promoted,
        )
        slots = args.max_concurrent_pairs or (64 if total_gib is not None else 8) * len(engine.endpoints)
        svc = Annotation(store, queue, serving, from_flags(
            AnnotateConfig, args, sampling=from_flags(SamplingParams, args), max_concurrent_pairs=slots,
            guidelines=guidelines), votes_to_next_round=scheduler.votes_to_next_round)

        # delete_cache: files handed to browsers (dataset exports) leave Gradio's cache after an hour.
        with gr.Blocks(title="PrefLoop", delete_cache=(3600, 3600)) as demo:
            with gr.Row():
                gr.Markdown("## PrefLoop — which answer is better?")
                if mode == "hf":
                    gr.LoginButton(elem_id="hf-login", scale=0)
            with gr.Tabs():
                with gr.Tab("Annotate", id="annotate"):
                    annotate.build(demo, svc, access)
                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    admin.build(demo, admin_tab, admin.Admin(store, rounds, scheduler, serving, hub, access,
                                                             data_dir / "exports", publisher))
            annotate.build_api(svc, access)
        demo.queue(default_concurrency_limit=16, max_size=1024)
        skip_spaces_hot_reload()
        _, url, _ = demo.launch(
            server_name=args.host, server_port=args.port, auth=users.check if users else None,
            prevent_thread_lock=True, ssr_mode=False,
            quiet=True, head=annotate.SHORTCUTS_JS, footer_links=["api"],
            auth_message="Log in to compare answers.",
            app_kwargs={"middleware": middleware(on_space=os.environ.get("SYSTEM") == "spaces")},
        )
        scheduler.start()
        hub.start(every_s=args.hub_every_minutes * 60)
        # Everything built so far lives as long as the app: keep it out of the garbage collector's
        # full passes, which otherwise walk it all and pause every request for tens of ms.
        gc.collect()
        gc.freeze()
    except BaseException:
        engine.close()
        raise
    print(f"PrefLoop is running at {url}", flush=True)
    by = "by an admin (Admin tab)" if promote == "manual" else "when they pass the gate"
    print(f"Who may annotate: {access.describe()}; rounds are promoted {by}; one person's share of a round "
          f"is capped at {args.max_share:.0%} (admins are not capped).", flush=True)
    if mode == "hf":
        print(f"Annotators sign in with Hugging Face; admins: {', '.join(sorted(admins)) or 'none (set --admins)'}.",
              flush=True)
    elif password:
        print(f"Log in as 'admin' with password '{password}' (stored hashed in {users_path}; "
              "this is the only time it is shown).", flush=True)
    else:
        print(f"Log in with a user from {users_path}; admins: {', '.join(sorted(admins))}.", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    return App(demo, engine, scheduler, hub, url)


def space_admins(explicit: str | None, env: dict[str, str] | None = None, api=None) -> set[str]:
    """hf mode's admins: --admins, else the Space's owner. An organisation cannot sign in, so a
    Space owned by one must name its admins; where the Hub cannot tell, say so and go on."""
    from collector.users import UsersError, owner_is_organisation

    env = os.environ if env is None else env
    if explicit:
        return {a.strip() for a in explicit.split(",") if a.strip()}
    owner = env.get("SPACE_AUTHOR_NAME", "")
    if not owner:
        raise UsersError("name the admins with --admins or PREFLOOP_ADMINS (Hugging Face user names)")
    is_org = owner_is_organisation(owner, api)
    if is_org:
        raise UsersError(f"this Space belongs to the organisation {owner!r}, which cannot sign in: list its admins by "
                         "Hugging Face user name in the Space variable PREFLOOP_ADMINS (or --admins)")
    if is_org is None:
        logger.warning("could not ask the Hub whether %s is an organisation; if it is, set PREFLOOP_ADMINS", owner)
    return {owner}


def middleware(on_space: bool) -> list:
    """ASGI middleware for Gradio's app: security headers, and the login throttle (ui/http.py).
    Behind a Space's proxy the client's address is the last X-Forwarded-For hop."""
    from starlette.middleware import Middleware

    from collector.users import LoginThrottle
    from ui.http import LoginGuard, SecurityHeaders

    return [Middleware(SecurityHeaders), Middleware(LoginGuard, throttle=LoginThrottle(), trust_forwarded=on_space)]


MAX_GUIDELINES_CHARS = 20_000


def read_guidelines(path: Path | None) -> str:
    """The guidelines file's text ("" without one); a one-line error for a file that cannot serve."""
    from storage.errors import UserError

    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--guidelines {path}: cannot read it as UTF-8 text ({e})") from None
    if len(text) > MAX_GUIDELINES_CHARS:
        raise UserError(f"--guidelines {path}: {len(text):,} characters; keep guidelines under "
                        f"{MAX_GUIDELINES_CHARS:,} (people read them before every session)")
    return text


def make_publisher(args: argparse.Namespace, store, rounds, hub):
    """The model repo's publisher when --hub-model and HF_TOKEN are given; else None (said once)."""
    from trainer.publish import Publisher

    token = os.environ.get("HF_TOKEN")
    if not args.hub_model:
        return None
    if not token:
        logger.warning("--hub-model %s given but HF_TOKEN is not set: adapters are not published", args.hub_model)
        return None
    from huggingface_hub import HfApi

    return Publisher(rounds.log, rounds.data_dir, args.hub_model, HfApi(token=token))


def make_hub(args: argparse.Namespace, store, data_dir: Path):
    """Hub sync when --hub-dataset and HF_TOKEN are given; else local only (said once)."""
    from storage.hub import HubSync

    salt = store.annotator_salt()
    token = os.environ.get("HF_TOKEN")
    api = None
    if args.hub_dataset and token:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    elif args.hub_dataset:
        logger.warning("--hub-dataset %s given but HF_TOKEN is not set: votes stay local", args.hub_dataset)
    return HubSync(store, data_dir / "hub", args.hub_dataset, api, salt=salt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "hash-password":
        from collector.users import hash_password

        name = input("user name: ").strip()
        print(f"{name}:{hash_password(getpass.getpass('password: '))}")
        return 0
    # Everything the app writes (votes, users, logs, adapters) is its owner's only, from creation.
    os.umask(0o077)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log_level, args.data_dir)
    stop = threading.Event()
    # SIGHUP (a closed terminal, a supervisor's reload) stops the app cleanly like SIGTERM: its
    # default would kill the app at once and leave the last votes unpushed.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    from storage.errors import UserError

    try:
        app = build(args)
    except (UserError, OSError) as e:
        print(f"prefloop: error: {e}", file=sys.stderr)
        return 2
    try:
        stop.wait()
    finally:
        logger.info("shutting down")
        app.scheduler.stop()
        app.demo.close()
        app.hub.flush()  # the last votes reach the Hub before the process ends
        app.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
