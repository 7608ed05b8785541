"""Votes -> a Hub dataset repo, with huggingface_hub. SQLite stays the source of truth.

New votes are staged as immutable parquet segments (``votes/<boot id>-<sequence>.v3.parquet``)
under ``<data-dir>/hub/staged``; a push uploads the staged files the repo does not have yet in one
commit, then moves them to ``hub/pushed``. A vote segment is never overwritten: names are unique
per boot, and files already present remotely are skipped, so a push that failed half way can
simply be retried. The ``preferences`` config is derived from the whole log (storage.pairs), so
each replica keeps one snapshot file per split (``preferences/<split>/<replica id>-<content
hash>.parquet``), restaged when the votes or the exclusions change; the commit that adds a new
one deletes the replica's last one, and a retried push finds it there. A repo written under an older
schema is brought up to date in the first push's commit (old vote segments upgraded to the
current columns, old preference segments replaced by the snapshot, the card rewritten). Without a
repo or a token the sync is local only, said once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from storage.export import (
    CONFIGS,
    SCHEMA,
    SEGMENT_SUFFIX,
    SPLITS,
    export_preferences,
    export_votes,
    upgrade_votes,
    write_card,
    write_guidelines,
)
from storage.pairs import HELDOUT_FRACTION
from storage.votes import VoteStore

logger = logging.getLogger(__name__)

STAGED_MARK = "hub_staged_watermark"
PUSHED_REVISION = "hub_pushed_revision"
PREFERENCES_MARK = "hub_preferences_staged"  # what the staged preferences snapshot was made from
REPLICA_ID = "hub_replica_id"


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


def _splits(paths: set[str]) -> tuple[str, ...]:
    """The preferences splits that have a file among ``paths``."""
    return tuple(s for s in SPLITS if any(p.startswith(f"preferences/{s}/") for p in paths))


class HubSync:
    """Stages and pushes vote segments. ``api`` is a ``huggingface_hub.HfApi`` (or None: local only)."""

    def __init__(self, store: VoteStore, hub_dir: Path, repo_id: str | None, api=None, salt: str = "",
                 private: bool = True, retries: int = 4, backoff_s: float = 2.0,
                 heldout_fraction: float = HELDOUT_FRACTION):
        self.store = store
        self.staged = Path(hub_dir) / "staged"
        self.pushed = Path(hub_dir) / "pushed"
        self.snapshot = self.staged / "preferences.snapshot"
        self.repo_id = repo_id
        self.api = api
        self.salt = salt
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.heldout_fraction = heldout_fraction
        self.boot_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        self.replica_id = store.get_setting(REPLICA_ID)
        if not self.replica_id:  # one per data dir, for the files it replaces (its preferences snapshot)
            self.replica_id = "replica-" + secrets.token_hex(6)
            store.set_setting(REPLICA_ID, self.replica_id)
        self.seq = 0
        self.status = HubStatus(enabled=bool(repo_id and api is not None), repo_id=repo_id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if not self.status.enabled:
            logger.info(self.status.line())

    # -- staging -------------------------------------------------------------------------

    def stage(self) -> int:
        """Export votes not staged yet as a new segment, and the preferences snapshot when the votes
        or the exclusions changed; returns how many votes the new segment holds."""
        with self._lock:
            after = int(self.store.get_setting(STAGED_MARK, "0"))
            upto = self.store.max_vote_id()
            n = 0
            if upto > after:
                self.seq += 1
                name = f"{self.boot_id}-{self.seq:06d}"
                n = export_votes(self.store, self.staged, name, after, upto, self.salt)
                # Files first, then the watermark: a crash in between stages those votes again under
                # a new name (readers dedupe on pair_id); it never loses them.
                self.store.set_setting(STAGED_MARK, str(upto))
                logger.info("staged segment %s: %d votes", name, n)
            mark = json.dumps([upto, sorted(self.store.excluded_annotators()), self.heldout_fraction])
            if upto and self.store.get_setting(PREFERENCES_MARK) != mark:
                # The manifest goes first: a push after a failed export uploads and deletes nothing
                # of the snapshot rather than delete the last pushed one for a half-written new one.
                self.snapshot.unlink(missing_ok=True)
                counts = export_preferences(self.store, self.staged, self.replica_id, self.heldout_fraction)
                self.staged.mkdir(parents=True, exist_ok=True)
                tmp = self.snapshot.with_suffix(".tmp")  # which files make this replica's snapshot now
                tmp.write_text(json.dumps(counts["files"]))
                os.replace(tmp, self.snapshot)
                self.store.set_setting(PREFERENCES_MARK, mark)
                logger.info("staged the preferences: %d training pairs, %d held out", counts["train"], counts["test"])
            return n

    def revision_holding(self, watermark: int) -> tuple[str, str | None] | None:
        """(repo, revision) of the dataset that holds every vote up to ``watermark``; the revision is
        None when those votes are not pushed yet; None without a dataset repo."""
        if not self.repo_id:
            return None
        pushed = json.loads(self.store.get_setting(PUSHED_REVISION, "{}") or "{}")
        return self.repo_id, pushed.get("revision") if pushed.get("watermark", -1) >= watermark else None

    def pending(self) -> list[Path]:
        return sorted(p for c in CONFIGS for p in (self.staged / c).rglob("*.parquet"))

    def refresh_status(self) -> HubStatus:
        self.status.pending_rows = self.store.count_log_rows(int(self.store.get_setting(STAGED_MARK, "0")))
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
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        with self._lock:
            files = self.pending()
            if not files and not self.snapshot.exists():
                return 0
            self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
            remote = set(self.api.list_repo_files(self.repo_id, repo_type="dataset"))
            ops = []
            current = set(json.loads(self.snapshot.read_text())) if self.snapshot.exists() else None
            for f in list(files):
                rel = f.relative_to(self.staged).as_posix()
                if rel.startswith("preferences/") and (current is None or rel not in current):
                    f.unlink()  # a snapshot whose making failed: never pushed, restaged next time
                    files.remove(f)
                elif rel not in remote:
                    ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)))
            staged = {f.relative_to(self.staged).as_posix() for f in files}
            if current is not None and current <= staged | remote:  # the new snapshot replaces the last one
                ops += [CommitOperationDelete(path_in_repo=old) for old in sorted(remote)
                        if old.startswith("preferences/") and old.count("/") == 2
                        and old.rsplit("/", 1)[1].startswith(f"{self.replica_id}-") and old not in current]
            upgraded = self._upgrade_ops(remote)
            ops += upgraded
            new = [g for g in self.store.guidelines() if f"guidelines/{g['version']}.md" not in remote]
            for path in write_guidelines(self.staged.parent / "card", new):  # a version is added once, never changed
                ops.append(CommitOperationAdd(path_in_repo=f"guidelines/{path.name}", path_or_fileobj=str(path)))
            after = (remote | {o.path_in_repo for o in ops if isinstance(o, CommitOperationAdd)}) - \
                {o.path_in_repo for o in ops if isinstance(o, CommitOperationDelete)}
            splits_before, splits_after = _splits(remote), _splits(after)
            if "README.md" not in remote or upgraded or splits_after != splits_before:
                card = write_card(self.staged.parent / "card", f"PrefLoop votes: {self.repo_id}",
                                  splits=splits_after or ("train",))
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
            self.snapshot.unlink(missing_ok=True)
            self.status.pushed_files += len(files)
            logger.info("hub push to %s: %d operations in one commit", self.repo_id, len(ops))
            return len(ops)

    def _upgrade_ops(self, remote: set[str]) -> list:
        """Commit operations that bring files written under an older schema up to date: each old
        vote segment (any replica's) rewritten with the current columns under the current suffix,
        and old preference segments removed (the snapshots replace them)."""
        import pyarrow.parquet as pq
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import EntryNotFoundError

        ops = []
        for rel in sorted(remote):
            parts = rel.split("/")
            version = re.search(r"\.v(\d+)\.parquet$", rel)
            if len(parts) != 2 or not rel.endswith(".parquet") or (version and int(version[1]) >= SCHEMA):
                # current, or newer than this PrefLoop: left alone
                continue
            if parts[0] == "votes":
                new_rel = rel[: version.start() if version else -len(".parquet")] + SEGMENT_SUFFIX
                out = self.staged.parent / "upgraded" / Path(new_rel).name
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    local = self.api.hf_hub_download(self.repo_id, rel, repo_type="dataset",
                                                     cache_dir=self.staged.parent / "upgrade-cache")
                    pq.write_table(upgrade_votes(pq.read_table(local)), out)
                except (OSError, ValueError, EntryNotFoundError) as e:  # pyarrow's are ValueError or OSError
                    # one unreadable old file must not stop new votes from reaching the Hub (next push: again)
                    logger.error("hub: %s could not be upgraded (%s); left as it is", rel, e)
                    continue
                if new_rel not in remote:
                    ops.append(CommitOperationAdd(path_in_repo=new_rel, path_or_fileobj=str(out)))
                ops.append(CommitOperationDelete(path_in_repo=rel))
            elif parts[0] == "preferences":
                ops.append(CommitOperationDelete(path_in_repo=rel))
        if ops:
            logger.info("hub: %d files written under an older schema brought up to date", len(ops))
        return ops

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
