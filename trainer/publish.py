"""Promoted adapters -> a Hub model repo: one commit and one tag per round, never overwriting.

Layout of the repo: ``README.md`` (written once, when the repo is made) and one folder per round,
``round-0003/`` (``adapter_config.json``, ``adapter_model.safetensors`` and the round's card,
``README.md``), added in one commit tagged ``round-0003``. A published round is never touched
again: a later round adds its own folder and tag, so every round stays loadable by its tag or its
folder (``PeftModel.from_pretrained(base, REPO, subfolder="round-0003")``), and vLLM servers that do
not share PrefLoop's data dir load it by name (``REPO/round-0003``, collector/vllm_plugin.py).

A push that fails is retried with backoff. It cannot half-publish: the folder arrives in one commit
(readers see all of it or none), and the tag, made last, is what marks a round published; a retry
after a commit whose answer was lost finds the folder and only tags it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.rounds import PROMOTED, RoundLog

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

REPO_CARD = """---
library_name: peft
tags:
- prefloop
- lora
- ipo
- preference-optimization
base_model: {base}
---

# {repo}

LoRA adapters trained by PrefLoop from people's votes between two answers:
each alignment round (IPO on LoRA) that passed its gate and was promoted is one folder here,
added in its own commit and tagged with its name. Nothing published is ever changed.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo}", subfolder="round-0001")  # or revision="round-0001"
```

Each folder's README.md says what the round trained on and how it scored.
"""

ROUND_CARD = """---
library_name: peft
base_model: {base}
tags:
- prefloop
- lora
- ipo
---

# {name}

A LoRA adapter (rank {rank}) on `{base}`, trained by PrefLoop's round {round} with IPO
(TRL `DPOTrainer`, `loss_type={losses}`) on people's votes between two answers.

| | |
| --- | --- |
| base model | `{base}` |
| round | {round} ({init}) |
| training pairs | {train_pairs} |
| held-out accuracy | {heldout} |
| KL to the reference | {kl} nats/token |
| people's win rate against the base | {win_rate} |
| votes | {votes} |
| promoted | {promoted} |

Gate: {reason}
"""


def _fmt(v: float | None, digits: int = 2) -> str:
    return "not measured" if v is None else f"{v:.{digits}f}"


def round_card(manifest: dict[str, Any], repo: str, win_rate: tuple[float, float, float] | None = None,
               dataset: tuple[str, str | None] | None = None) -> str:
    """The card of one published round: base, round, held-out accuracy, KL, people's win rate against
    the base (with its interval), and the dataset repo and revision it was trained on."""
    metrics = manifest.get("metrics") or {}
    n, correct = metrics.get("heldout_pairs"), metrics.get("heldout_correct")
    heldout = f"{correct / n:.2f} ({correct} of {n} pairs)" if n and correct is not None else \
        _fmt(metrics.get("heldout_accuracy"))
    wins = "no arena votes yet" if win_rate is None else \
        f"{win_rate[0]:.2f} (95% interval {win_rate[1]:.2f}-{win_rate[2]:.2f}, arena pairs, Bradley-Terry)"
    votes = f"1 to {manifest.get('watermark')} of this app's vote log"
    if dataset is not None:
        repo_id, revision = dataset
        votes += f"; dataset [`{repo_id}`](https://huggingface.co/datasets/{repo_id})" + (
            f" at revision `{revision}`" if revision else " (not pushed up to these votes yet)")
    train = (manifest.get("config") or {}).get("train") or {}
    losses = [train.get("loss", "ipo")] + (["sft"] if train.get("sft_weight") else [])
    return ROUND_CARD.format(
        base=manifest.get("base_model"), name=manifest.get("adapter"), round=manifest.get("round"),
        rank=train.get("lora_r", "?"), losses=losses,
        init="continued the serving adapter" if manifest.get("init") else "from the base",
        train_pairs=manifest.get("train_pairs"), heldout=heldout, kl=_fmt(metrics.get("kl_per_token"), 4),
        win_rate=wins, votes=votes,
        promoted=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.get("finished_at") or time.time())),
        reason=manifest.get("reason", ""))


@dataclass
class Published:
    name: str
    repo: str
    revision: str
    new: bool


class Publisher:
    """Publishes promoted rounds of one data dir to ``repo`` with ``api`` (a ``huggingface_hub.HfApi``)."""

    def __init__(self, log: RoundLog, data_dir: Path, repo: str, api, private: bool = True, retries: int = 4,
                 backoff_s: float = 2.0):
        self.log = log
        self.data_dir = Path(data_dir)
        self.repo = repo
        self.api = api
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.last_error: str | None = None

    def manifest(self, name: str) -> dict[str, Any]:
        return json.loads((self.data_dir / "rounds" / f"{name}.json").read_text())

    def unpublished(self) -> list[str]:
        """Promoted rounds not published yet, oldest first."""
        return [r["adapter"] for r in self.log.all(PROMOTED) if not self.log.published(r["id"])]

    def publish(self, name: str, win_rate: tuple[float, float, float] | None = None,
                dataset: tuple[str, str | None] | None = None) -> Published:
        """Publish one promoted round (idempotent); retried with backoff; raises the last error."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                out = self._publish_once(name, win_rate, dataset)
                self.last_error = None
                return out
            except Exception as e:  # network, HTTP: nothing half-published, try again
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.warning("publishing %s, attempt %d/%d failed: %s", name, attempt, self.retries, self.last_error)
                if attempt == self.retries:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def publish_pending(self, win_rate=None, dataset=None) -> list[Published]:
        """Publish every promoted round not published yet, oldest first. ``win_rate(name)`` and
        ``dataset(watermark)`` give what the card says about people's verdict and the dataset."""
        out = []
        for name in self.unpublished():
            watermark = self.manifest(name).get("watermark", 0)
            out.append(self.publish(name, win_rate(name) if win_rate else None,
                                    dataset(watermark) if dataset else None))
        return out

    def _publish_once(self, name, win_rate, dataset) -> Published:
        from huggingface_hub import CommitOperationAdd

        row = next((r for r in self.log.all(PROMOTED) if r["adapter"] == name), None)
        if row is None:
            raise ValueError(f"{name} is not a promoted round; only promoted rounds are published")
        manifest = self.manifest(name)
        self.api.create_repo(self.repo, repo_type="model", private=self.private, exist_ok=True)
        tags = {t.name: t.target_commit for t in self.api.list_repo_refs(self.repo).tags}
        if name in tags:  # published before (perhaps by an attempt whose answer was lost)
            self.log.mark_published(row["id"], self.repo, tags[name])
            return Published(name, self.repo, tags[name], new=False)
        remote = set(self.api.list_repo_files(self.repo))
        ops = []
        if not any(path.startswith(f"{name}/") for path in remote):
            folder = self.data_dir / "adapters" / name
            for f in ADAPTER_FILES:
                ops.append(CommitOperationAdd(path_in_repo=f"{name}/{f}", path_or_fileobj=str(folder / f)))
            card = round_card(manifest, self.repo, win_rate, dataset).encode()
            ops.append(CommitOperationAdd(path_in_repo=f"{name}/README.md", path_or_fileobj=card))
        if "README.md" not in remote:
            repo_card = REPO_CARD.format(repo=self.repo, base=manifest.get("base_model")).encode()
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=repo_card))
        if ops:
            commit = self.api.create_commit(self.repo, operations=ops, commit_message=f"PrefLoop {name}: "
                                            f"{manifest.get('reason', '')[:200]}")
            revision = commit.oid
        else:  # the folder arrived in an earlier attempt, whose answer was lost: tag what is there
            revision = self.api.list_repo_refs(self.repo).branches[0].target_commit
        self.api.create_tag(self.repo, tag=name, revision=revision, tag_message=f"PrefLoop round {row['id']}")
        self.log.mark_published(row["id"], self.repo, revision)
        logger.info("published %s to %s at %s", name, self.repo, revision)
        return Published(name, self.repo, revision, new=True)
