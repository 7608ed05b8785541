"""The round lifecycle: lock, snapshot at a watermark, train in a subprocess, gate, promote.

Promotion writes ``adapters/round-NNNN`` atomically (temporary folder, fsync, rename) and a
manifest ``rounds/round-NNNN.json``; the app's ``collector.serving.Serving`` then hot-swaps it
into vLLM. Nothing here talks to vLLM, so a round can run from the CLI or the admin tab alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from storage.errors import UserError
from storage.flags import setting
from storage.pairs import HELDOUT_FRACTION, JUDGE, build_pairs, is_heldout, training_rows
from storage.procs import die_with_parent
from storage.rounds import AWAITING, FAILED, PROMOTED, REJECTED, RoundLog
from storage.serving import BASE, ServingLog
from storage.votes import VoteStore
from trainer.data import cap_shares
from trainer.ipo import TrainConfig, TrainSpec

logger = logging.getLogger(__name__)


class RoundError(UserError):
    """A round could not start (another is running, too few pairs) or failed."""


@dataclass
class RoundConfig:
    """How rounds are run and gated; each field's help is its flag's (storage/flags.py).

    Why these defaults (docs/experiments.md): a round that continues an adapter trains at 1e-4, as
    on round 1's own answers it won as often as at 3e-4 with a quarter of the drift, and on the
    base's answers 3e-4 drove it into repetition. The held-out gate refuses an adapter only when
    the votes show it is worse (a one-sided Clopper-Pearson bound below the floor), not when a
    point estimate on a dozen pairs dips: an adapter at 0.625 falls below 0.5 on 12 pairs one time
    in eight. The distinct-bigram check compares with the base on the same prompts, since a small
    model's own greedy poem scores 0.44 and a fixed floor alone misleads.
    """

    init: str = setting("previous", help="previous: continue the serving adapter on the votes since the last "
                        "round; fresh: a new adapter from the base on all votes", choices=["previous", "fresh"])
    continue_learning_rate: float | None = setting(1e-4, help="learning rate of a round that continues an "
                                                   "adapter (--learning-rate is for rounds from the base)")
    min_pairs: int = setting(4, help="fewest training pairs worth a round")
    heldout_fraction: float = setting(HELDOUT_FRACTION, help="share of prompts held out for the gate")
    min_heldout_accuracy: float = setting(0.5, help="gate: refuse an adapter whose held-out votes show accuracy "
                                          "below this floor")
    heldout_confidence: float = setting(0.95, help="gate: the confidence with which they must show it "
                                        "(one-sided bound)")
    max_heldout_pairs: int = setting(96, help="held-out pairs scored: every held-out vote so far, newest first, "
                                     "up to this many")
    min_distinct_2: float = setting(0.3, help="gate: mean distinct-bigram ratio of sample answers")
    max_distinct_2_drop: float = setting(0.15, help="gate: how far that ratio may fall below the base's")
    sample_prompts: int = setting(3, help="sample answers generated for the degeneration gate")
    timeout_s: float = setting(3600.0, help="kill the training subprocess after this many seconds")
    launcher: list[str] = setting(default_factory=list, split=True, env="PREFLOOP_TRAINER_LAUNCHER",
                                  flags=["--launcher", "--trainer-launcher"],
                                  help='run training under a launcher, e.g. "accelerate launch --multi_gpu '
                                  '--num_processes 4" for 4 GPUs')
    max_share: float = setting(0.25, help="largest share of a round's training pairs one person may hold "
                               "(admins are not capped; 1: no cap); the rest wait for later rounds")
    promote: str = setting("auto", help="auto: a round that passes the gate is served at once; manual: it waits "
                           "for an admin in the Admin tab", choices=["auto", "manual"])
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.init not in ("previous", "fresh"):
            raise ValueError(f"init {self.init!r}: use 'previous' or 'fresh'")
        if self.promote not in ("auto", "manual"):
            raise ValueError(f"promote {self.promote!r}: use 'auto' or 'manual'")
        if not 0 < self.max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")


SAMPLE_PROMPTS = [
    "Give me three tips for staying focused while working from home.",
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
]


def adapter_name(round_id: int) -> str:
    return f"round-{round_id:04d}"


def distinct_n(text: str, n: int = 2) -> float:
    """Share of distinct word n-grams; repetition drives it towards 0 (an empty answer is 0)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0 if not words else 1.0
    return len(set(grams)) / len(grams)


def heldout_accuracy(result: dict[str, Any], loss: str = "ipo") -> float | None:
    """The held-out accuracy the gate uses: on the length-normalised margin for IPO (what it
    optimises), on TRL's token-summed margin for DPO; exact from the counts where recorded."""
    n, k = result.get("heldout_pairs", 0), result.get("heldout_correct")
    if n and k is not None:
        return k / n
    acc = result.get("eval_ipo/accuracy") if loss == "ipo" else None
    return acc if acc is not None else result.get("eval_rewards/accuracies")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def accuracy_upper_bound(correct: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on an accuracy seen as ``correct`` of ``n``: the
    largest p under which so few correct answers still have probability 1 - confidence."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n <= 0 or correct >= n:
        return 1.0
    lo, hi = correct / n, 1.0
    for _ in range(60):  # P(X <= correct) falls as p rises: bisect for the p where it is 1 - confidence
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(correct, n, mid) > 1 - confidence else (lo, mid)
    return hi


def gate(result: dict[str, Any], cfg: RoundConfig) -> tuple[bool, str]:
    """Decide whether a trained adapter may be promoted; returns (ok, reason)."""
    for key in ("train_loss", "eval_loss"):
        v = result.get(key)
        if v is not None and not math.isfinite(v):
            return False, f"{key} is {v}: training diverged"
    if not result.get("weights_finite", True):
        return False, "LoRA weights are NaN or Inf after training: training diverged"
    if result.get("lora_changed_fraction", 0.0) == 0.0:
        return False, "no LoRA weight changed"
    acc = heldout_accuracy(result, cfg.train.loss)
    n = result.get("heldout_pairs", 0)
    heldout = ""
    if acc is not None and n:
        upper = accuracy_upper_bound(round(acc * n), n, cfg.heldout_confidence)
        result["heldout_accuracy"], result["heldout_accuracy_upper"] = acc, upper
        heldout = (f"held-out accuracy {acc:.2f} on {n} pairs (at most {upper:.2f} at "
                   f"{cfg.heldout_confidence:.0%} confidence; floor {cfg.min_heldout_accuracy:.2f})")
        if upper < cfg.min_heldout_accuracy:
            return False, f"{heldout}: the held-out votes say this adapter is below the floor"
    samples = result.get("samples") or []
    if samples:
        d2 = sum(distinct_n(s) for s in samples) / len(samples)
        base = result.get("base_samples") or []
        base_d2 = sum(distinct_n(s) for s in base) / len(base) if base else 1.0
        result["distinct_2"], result["base_distinct_2"] = d2, base_d2
        if d2 < cfg.min_distinct_2 or d2 < base_d2 - cfg.max_distinct_2_drop:
            return False, (f"sample answers repeat themselves (distinct-2 {d2:.2f}; base {base_d2:.2f}; "
                           f"floor {cfg.min_distinct_2:.2f}, allowed drop {cfg.max_distinct_2_drop:.2f})")
    return True, "passed: finite loss" + (f", {heldout}" if heldout else "")


def scored(heldout: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The held-out pairs a round scores: those with a preference (storage.pairs leaves held-out
    ties out; imported pairs may carry them), the newest ``limit``."""
    strict = [p for p in heldout if p.get("choice") != "tie"]
    return strict[max(0, len(strict) - limit):]


def split_votes(rows: list[dict[str, Any]], consumed: set[int], cfg: RoundConfig, uncapped: set[str] = frozenset(),
                bootstrap_until: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(train, held-out, held back) for a round over ``rows`` (every vote up to the watermark,
    oldest first). It trains on the votes no promoted round consumed yet, within the per-person
    cap (``held back``: pairs per person that wait for a later round), and scores every held-out
    vote so far, not only the new ones: the gate judges the adapter on more pairs than one round's
    tenth. ``bootstrap_until``: see storage.pairs.training_rows."""
    train, heldout = build_pairs(rows, cfg.heldout_fraction, bootstrap_until)
    train, held_back = cap_shares([p for p in train if p["vote_id"] not in consumed], cfg.max_share, uncapped)
    return train, scored(heldout, cfg.max_heldout_pairs), held_back


def sha256_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the trainer and whatever it started (a launcher's workers): its own process group."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Rounds:
    """Runs rounds over one data dir. ``on_progress`` receives each metrics row as it arrives."""

    def __init__(self, store: VoteStore, data_dir: Path, base_model: str):
        self.store = store
        self.log = RoundLog(store)
        self.data_dir = Path(data_dir)
        self.base_model = base_model
        self.adapters = self.data_dir / "adapters"
        self.manifests = self.data_dir / "rounds"
        self.work = self.data_dir / "work"
        for d in (self.adapters, self.manifests, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.data_dir / "round.lock"))

    # -- state ---------------------------------------------------------------------------

    def cleanup(self) -> bool:
        """Mark rounds whose trainer died as failed and remove temporary folders, under the round
        lock: while a round runs (in this process or another) nothing is touched and this returns
        False. Keeps the work folders (logs) of the newest ``KEEP_WORK`` unpromoted rounds."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            self._cleanup_locked()
        finally:
            self.lock.release()
        return True

    KEEP_WORK = 10

    def _cleanup_locked(self) -> None:
        # Under the lock no round of ours runs: a row still "running" belongs to a dead trainer.
        for round_id in self.log.fail_dead(lambda pid: pid_alive(pid) and pid != os.getpid(),
                                           "the trainer process died before finishing"):
            logger.warning("round %d marked failed: its trainer died", round_id)
        for tmp in self.adapters.glob("*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for old in sorted(p for p in self.work.iterdir() if p.is_dir())[: -self.KEEP_WORK]:
            shutil.rmtree(old, ignore_errors=True)

    def promoted(self) -> list[dict[str, Any]]:
        """Promoted rounds, oldest first."""
        return self.log.all(PROMOTED)

    def all_rounds(self) -> list[dict[str, Any]]:
        return self.log.all()

    def last_watermark(self) -> int:
        return self.log.last_watermark()

    def last_attempt_watermark(self) -> int:
        """The watermark of the newest finished round of the kind the next one will be (on the
        judges' votes while bootstrapping, else on people's), whatever its verdict: the schedule
        counts new votes from here, so a rejected round does not trigger again on the same votes,
        and people's votes cast during a bootstrap count for the first round on people."""
        return self.log.last_attempt_watermark(judges=self.store.bootstrapping())

    def awaiting(self) -> dict[str, Any] | None:
        """The round waiting for an admin's decision (manual promotion), if any."""
        rows = self.log.all(AWAITING)
        return rows[-1] if rows else None

    def approve(self, round_id: int, by: str) -> str:
        """Promote an awaiting round; returns its adapter name (the app then hot-swaps it)."""
        row = self.log.get(round_id)
        if row is None or row["status"] != AWAITING:
            raise RoundError(f"round {round_id} is not waiting for a decision"
                             + (f" (it is {row['status']})" if row else ""))
        if not self.log.decide(round_id, PROMOTED, f"{row['reason']}; promoted by {by}"):
            raise RoundError(f"round {round_id} was decided by someone else meanwhile")
        self._update_manifest(round_id, status=PROMOTED, promoted_by=by)
        logger.info("round %d promoted by %s", round_id, by)
        return row["adapter"]

    def reject(self, round_id: int, by: str) -> None:
        """Turn an awaiting round down; its adapter is removed (it was never served)."""
        row = self.log.get(round_id)
        if row is None or not self.log.decide(round_id, REJECTED, f"rejected by {by}"):
            raise RoundError(f"round {round_id} is not waiting for a decision")
        shutil.rmtree(self.adapters / row["adapter"], ignore_errors=True)
        self._update_manifest(round_id, status=REJECTED, rejected_by=by)
        logger.info("round %d rejected by %s", round_id, by)

    def _update_manifest(self, round_id: int, **changes: Any) -> None:
        path = self.manifests / f"{adapter_name(round_id)}.json"
        if path.exists():
            manifest = {**json.loads(path.read_text()), **changes}
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(tmp, path)

    # -- a round -------------------------------------------------------------------------

    def continues(self, cfg: RoundConfig) -> str | None:
        """The adapter folder a round starts from, and uses as its reference: the served version
        under ``init="previous"`` (iterative IPO), else None (the base). Decided here only."""
        if cfg.init == "fresh":
            return None
        current = ServingLog(self.store).current()
        if current == BASE:
            return None
        path = self.adapters / current
        if not path.is_dir():
            logger.warning("the served version %s has no folder in %s; the round starts from the base",
                           current, self.adapters)
            return None
        return str(path)

    def run(
        self,
        cfg: RoundConfig,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        seed_pairs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run one round to a verdict; returns the manifest. RoundError if one is running.

        The round continues what ``continues`` names. ``seed_pairs`` (warm start): train on these
        imported pairs instead of votes, from the base.
        """
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RoundError(
                "a round is already running; wait for it to finish (see `python -m trainer status`)"
            ) from None
        try:
            self._cleanup_locked()
            return self._run_locked(cfg, on_progress, seed_pairs)
        finally:
            self.lock.release()

    def _run_locked(self, cfg, on_progress, seed_pairs) -> dict[str, Any]:
        held_back: dict[str, int] = {}
        kind = "dataset"
        if seed_pairs is not None:  # a warm start consumes no votes
            watermark = after = self.last_watermark()
            init = None
            train, heldout = [], []
            for p in seed_pairs:
                (heldout if is_heldout(p["prompt"], cfg.heldout_fraction) else train).append(p)
            heldout = scored(heldout, cfg.max_heldout_pairs)
        else:
            watermark = self.store.max_vote_id()
            after = 0 if cfg.init == "fresh" else self.last_watermark()
            init = self.continues(cfg)
            consumed = set() if cfg.init == "fresh" else self.log.consumed_votes()
            rows = self.store.votes_with_pairs(0, watermark)
            bootstrap = self.store.judge_bootstrap()
            kind = training_rows(rows, bootstrap)[1]
            uncapped = self.store.admin_keys()
            if kind == JUDGE:  # a distilled round is the judges' by design: the per-person cap is for people
                uncapped |= set(self.store.judges())
            train, heldout, held_back = split_votes(rows, consumed, cfg, uncapped, bootstrap)
        if len(train) < cfg.min_pairs:
            capped = (f" ({sum(held_back.values())} more wait: no one person may hold more than "
                      f"{cfg.max_share:.0%} of a round's pairs, so more people must vote)") if held_back else ""
            raise RoundError(
                f"{len(train)} training pairs since vote {after}{capped}; a round needs at least {cfg.min_pairs}. "
                "Collect more votes (ties and left/right count; both-bad does not)."
            )
        round_id = self.log.start(watermark, os.getpid(), kind)
        name = adapter_name(round_id)
        logger.info("round %d started: %d train / %d held-out pairs, votes %d..%d, init=%s",
                    round_id, len(train), len(heldout), after + 1, watermark, init or "base")
        work = self.work / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        lr = cfg.continue_learning_rate if init and cfg.continue_learning_rate is not None else cfg.train.learning_rate
        tcfg = TrainConfig(**{**asdict(cfg.train), "learning_rate": lr,
                              "sample_prompts": SAMPLE_PROMPTS[: cfg.sample_prompts]})
        spec = TrainSpec(self.base_model, str(work), train, heldout, init, tcfg)
        spec.save(work / "spec.json")
        manifest: dict[str, Any] = {
            "round": round_id, "adapter": name, "watermark": watermark, "after": after,
            "init": init, "base_model": self.base_model, "config": asdict(cfg),
            "source": "dataset" if seed_pairs is not None else "votes", "votes_kind": kind,
            "train_pairs": len(train), "heldout_pairs": len(heldout), "learning_rate": lr,
            "held_back_pairs": sum(held_back.values()), "started_at": time.time(),
        }
        vote_ids = sorted({p["vote_id"] for p in train})
        try:
            result = self._train_subprocess(work, round_id, cfg.timeout_s, on_progress, cfg.launcher)
            ok, reason = gate(result, cfg)
            manifest["metrics"] = result
            if ok:
                manifest["sha256"] = self._promote(work / "adapter", self.adapters / name)
                status = PROMOTED if cfg.promote == "auto" else AWAITING
                if status == AWAITING:
                    reason += "; waiting for an admin to promote it (Admin tab)"
            else:
                status = REJECTED
        except RoundError as e:
            status, reason = FAILED, str(e)
        except BaseException as e:
            status, reason = FAILED, f"{type(e).__name__}: {e}"
            self._finish(round_id, status, reason, None, manifest, vote_ids)
            raise
        kept = status in (PROMOTED, AWAITING)
        if status == AWAITING:  # one decision at a time: a newer candidate replaces an older one
            for older in self.log.all(AWAITING):
                self.reject(older["id"], f"round {round_id} (newer)")
        self._finish(round_id, status, reason, name if kept else None, manifest, vote_ids)
        if kept:
            shutil.rmtree(work, ignore_errors=True)  # failed rounds keep their logs for the admin
        return manifest

    def _finish(self, round_id, status, reason, adapter, manifest, vote_ids=()) -> None:
        manifest.update({"status": status, "reason": reason, "finished_at": time.time()})
        steps = self.work / adapter_name(round_id) / "metrics.jsonl"
        if steps.exists():  # per-step metrics outlive the work dir: the admin's training plots
            shutil.copyfile(steps, self.manifests / f"{adapter_name(round_id)}.metrics.jsonl")
        spec = self.work / adapter_name(round_id) / "spec.json"
        if spec.exists():  # exactly what the round trained and scored on, for audits and the export check
            shutil.copyfile(spec, self.manifests / f"{adapter_name(round_id)}.spec.json")
        path = self.manifests / f"{adapter_name(round_id)}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, path)
        self.log.finish(round_id, status, reason, adapter, vote_ids)
        logger.info("round %d %s: %s", round_id, status, reason)

    def _train_subprocess(self, work: Path, round_id: int, timeout_s: float, on_progress,
                          launcher: list[str]) -> dict[str, Any]:
        log = open(work / "train.log", "wb")
        command = [*launcher] if launcher else [sys.executable]
        proc = subprocess.Popen(
            [*command, "-m", "trainer.ipo", str(work / "spec.json")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.log.set_pid(round_id, proc.pid)
        metrics = work / "metrics.jsonl"
        seen = 0
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                code = proc.poll()
                seen = self._relay(metrics, seen, on_progress)
                if code is not None:
                    break
                if time.monotonic() > deadline:
                    _kill_group(proc)
                    raise RoundError(f"training took longer than {timeout_s:.0f} s and was stopped")
                time.sleep(0.5)
        except BaseException:
            _kill_group(proc)
            raise
        result_path = work / "result.json"
        if code != 0 or not result_path.exists():
            tail = (work / "train.log").read_text(errors="replace").splitlines()[-15:]
            what = "was killed (out of memory?)" if code and code < 0 else f"exited with code {code}"
            raise RoundError(f"the training subprocess {what}; last log lines:\n" + "\n".join(tail))
        return json.loads(result_path.read_text())

    @staticmethod
    def _relay(metrics: Path, seen: int, on_progress) -> int:
        if not metrics.exists():
            return seen
        lines = metrics.read_text().splitlines()
        for line in lines[seen:]:
            try:
                row = json.loads(line)
            except ValueError:
                return seen  # a line being written; read it next time
            if on_progress:
                on_progress(row)
            seen += 1
        return seen

    def _promote(self, src: Path, dst: Path) -> str:
        """Copy the adapter to ``dst`` atomically: temporary folder, fsync, rename."""
        if dst.exists():
            raise RoundError(f"{dst} already exists; promoted adapters are immutable")
        tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(src, tmp)
            fsync_tree(tmp)
            digest = sha256_dir(tmp)
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        except OSError as e:  # a full disk, say: nothing half-written is left to be served
            shutil.rmtree(tmp, ignore_errors=True)
            raise RoundError(f"could not write the adapter to {dst.parent}: {e.strerror or e}") from e
        return digest
