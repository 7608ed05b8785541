"""Votes -> a Hub dataset repo, with huggingface_hub. SQLite stays the source of truth.

New votes are staged as immutable parquet segments (``<boot id>-<sequence>.parquet``) under
``<data-dir>/hub/staged``; a push uploads the staged files the repo does not have yet in one
commit, then moves them to ``hub/pushed``. A remote file is never overwritten or deleted: names
are unique per boot, and files already present remotely are skipped, so a push that failed half
way can simply be retried. Without a repo or a token the sync is local only, said once.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from storage.export import CONFIGS, export_segment, write_card, write_guidelines
from storage.votes import VoteStore

logger = logging.getLogger(__name__)

STAGED_MARK = "hub_staged_watermark"
PUSHED_REVISION = "hub_pushed_revision"


@dataclass
class HubStatus:
    enabled: bool
    repo_id: str | None
    last_push: float | None = None
    last_error: str | None = None
    pending_rows: int = 0
    pending_files: int = 0
    pushed_files: int = 0

    def line(self) -> str:
        if not self.enabled:
            err = f"; last error: {self.last_error}" if self.last_error else ""
            return f"Hub sync off (no --hub-dataset or no HF_TOKEN): votes are stored locally only{err}"
        when = time.strftime("%H:%M:%S", time.localtime(self.last_push)) if self.last_push else "never"
        err = f"; last error: {self.last_error}" if self.last_error else ""
        return (f"Hub {self.repo_id}: last push {when}, {self.pending_rows} votes not yet staged, "
                f"{self.pending_files} files waiting{err}")


class HubSync:
    """Stages and pushes vote segments. ``api`` is a ``huggingface_hub.HfApi`` (or None: local only)."""

    def __init__(self, store: VoteStore, hub_dir: Path, repo_id: str | None, api=None, salt: str = "",
                 private: bool = True, retries: int = 4, backoff_s: float = 2.0):
        self.store = store
        self.staged = Path(hub_dir) / "staged"
        self.pushed = Path(hub_dir) / "pushed"
        self.repo_id = repo_id
        self.api = api
        self.salt = salt
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.boot_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        self.seq = 0
        self.status = HubStatus(enabled=bool(repo_id and api is not None), repo_id=repo_id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if not self.status.enabled:
            logger.info(self.status.line())

    # -- staging -------------------------------------------------------------------------

    def stage(self) -> int:
        """Export votes not staged yet as a new segment; returns how many votes it holds."""
        with self._lock:
            after = int(self.store.get_setting(STAGED_MARK, "0"))
            upto = self.store.max_vote_id()
            if upto <= after:
                return 0
            self.seq += 1
            name = f"{self.boot_id}-{self.seq:06d}"
            counts = export_segment(self.store, self.staged, name, after, upto, self.salt)
            # Files first, then the watermark: a crash in between stages those votes again under a
            # new name (readers dedupe on pair_id); it never loses them.
            self.store.set_setting(STAGED_MARK, str(upto))
            logger.info("staged segment %s: %d votes, %d preference pairs",
                        name, counts["votes"], counts["preferences"])
            return counts["votes"]

    def revision_holding(self, watermark: int) -> tuple[str, str | None] | None:
        """(repo, revision) of the dataset that holds every vote up to ``watermark``; the revision is
        None when those votes are not pushed yet; None without a dataset repo."""
        if not self.repo_id:
            return None
        pushed = json.loads(self.store.get_setting(PUSHED_REVISION, "{}") or "{}")
        return self.repo_id, pushed.get("revision") if pushed.get("watermark", -1) >= watermark else None

    def pending(self) -> list[Path]:
        return sorted(p for c in CONFIGS for p in (self.staged / c).glob("*.parquet"))

    def refresh_status(self) -> HubStatus:
        self.status.pending_rows = self.store.count_votes(int(self.store.get_setting(STAGED_MARK, "0")))
        self.status.pending_files = len(self.pending())
        return self.status

    # -- pushing -------------------------------------------------------------------------

    def push(self) -> int:
        """Stage, then upload what the repo lacks; retried with backoff. Returns files uploaded.
        Never raises: a failure is kept in ``status.last_error`` (the Admin tab shows it), and what
        was staged before is still pushed."""
        staging_error = None
        try:
            self.stage()
        except Exception as e:  # a full disk, a permission: the votes stay in SQLite, staged next time
            staging_error = self.status.last_error = f"staging failed: {type(e).__name__}: {e}"[:300]
            logger.exception("hub staging failed")
        if not self.status.enabled:
            return 0
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                n = self._push_once()
                self.status.last_push, self.status.last_error = time.time(), staging_error
                self.refresh_status()
                return n
            except Exception as e:  # network, HTTP, auth: keep the files, report, retry
                self.status.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.warning("hub push attempt %d/%d failed: %s", attempt, self.retries, self.status.last_error)
                if attempt < self.retries and not self._stop.wait(delay):
                    delay *= 2
        self.refresh_status()
        return 0

    def _push_once(self) -> int:
        from huggingface_hub import CommitOperationAdd

        with self._lock:
            files = self.pending()
            if not files:
                return 0
            self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
            remote = set(self.api.list_repo_files(self.repo_id, repo_type="dataset"))
            ops = []
            for f in files:
                rel = f.relative_to(self.staged).as_posix()
                if rel not in remote:
                    ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)))
            new = [g for g in self.store.guidelines() if f"guidelines/{g['version']}.md" not in remote]
            for path in write_guidelines(self.staged.parent / "card", new):  # a version is added once, never changed
                ops.append(CommitOperationAdd(path_in_repo=f"guidelines/{path.name}", path_or_fileobj=str(path)))
            if "README.md" not in remote:
                card = write_card(self.staged.parent / "card", f"PrefLoop votes: {self.repo_id}")
                ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card)))
            if ops:
                commit = self.api.create_commit(
                    self.repo_id, repo_type="dataset", operations=ops,
                    commit_message=f"PrefLoop: {len(ops)} files from boot {self.boot_id}",
                )
                # which dataset revision holds the votes up to the staged watermark (model cards cite it)
                self.store.set_setting(PUSHED_REVISION, json.dumps({
                    "revision": commit.oid, "watermark": int(self.store.get_setting(STAGED_MARK, "0"))}))
            for f in files:  # uploaded now, or already there from an earlier attempt
                dest = self.pushed / f.relative_to(self.staged)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(f), dest)
            self.status.pushed_files += len(files)
            logger.info("hub push to %s: %d files uploaded, %d already there", self.repo_id,
                        len([o for o in ops if o.path_in_repo != "README.md"]), len(files) - len(ops))
            return len(ops)

    # -- background ----------------------------------------------------------------------

    def start(self, every_s: float = 300.0) -> None:
        if not self.status.enabled:
            return
        threading.Thread(target=self._loop, args=(every_s,), name="hub-sync", daemon=True).start()

    def _loop(self, every_s: float) -> None:
        """Push every ``every_s`` until stopped; no error ends the loop."""
        while not self._stop.wait(every_s):
            try:
                self.push()
            except Exception as e:
                self.status.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.exception("hub sync failed; trying again in %.0f s", every_s)

    def flush(self) -> None:
        """Final push at shutdown (SIGTERM or normal exit), one attempt per retry budget."""
        self._stop.set()
        self._stop = threading.Event()  # let the retries in this final push wait their backoff
        self.push()
