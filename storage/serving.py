"""The serving record: which version serves, the versions served before it, and the marks the
loop leaves on versions (rolled back, failed to swap in), in the store's settings table.

``collector.serving.Serving`` is the only writer in the app; ``python -m trainer`` reads it and
asks for a rollback through it. Keeping every key here means no other module spells one.
"""

from __future__ import annotations

import json

from storage.votes import VoteStore

BASE = "base"
_HISTORY = "serving_history"
_CURRENT = "serving_adapter"
_ROLLBACK_REQUEST = "rollback_request"
_BASE_MODEL = "base_model"


class ServingLog:
    """Named reads and writes of what is served, for one vote store."""

    def __init__(self, store: VoteStore):
        self.store = store

    def history(self) -> list[str]:
        """Versions served, oldest first; the last one serves now (none: the base)."""
        return json.loads(self.store.get_setting(_HISTORY, "[]") or "[]")

    def current(self) -> str:
        history = self.history()
        return history[-1] if history else BASE

    def record(self, history: list[str]) -> None:
        """The served versions after a swap, restore or rollback (the last one serves)."""
        self.store.set_setting(_HISTORY, json.dumps(list(history)))
        self.store.set_setting(_CURRENT, history[-1] if history else BASE)

    # -- a rollback asked for from outside the app (python -m trainer rollback) -------------

    def request_rollback(self) -> None:
        self.store.set_setting(_ROLLBACK_REQUEST, "1")

    def take_rollback_request(self) -> bool:
        """True once per request: the caller carries it out."""
        if not self.store.get_setting(_ROLLBACK_REQUEST):
            return False
        self.store.set_setting(_ROLLBACK_REQUEST, "")
        return True

    # -- marks on versions ---------------------------------------------------------------

    def mark_rolled_back(self, name: str) -> None:
        """The schedule does not serve a rolled-back version again by itself."""
        self.store.set_setting(f"rolled_back:{name}", "1")

    def clear_rolled_back(self, name: str) -> None:
        """An admin chose the version again: the schedule may keep it."""
        self.store.set_setting(f"rolled_back:{name}", "")

    def mark_swap_failed(self, name: str, reason: str) -> None:
        """A version that failed to go live is not retried every few seconds."""
        self.store.set_setting(f"swap_failed:{name}", reason or "failed")

    def skipped(self, name: str) -> bool:
        """Rolled back or failed to swap in: the schedule passes it by."""
        return bool(self.store.get_setting(f"rolled_back:{name}") or self.store.get_setting(f"swap_failed:{name}"))

    # -- the base model the app serves, for the trainer CLI -----------------------------

    def set_base_model(self, model: str) -> None:
        self.store.set_setting(_BASE_MODEL, model)

    def base_model(self) -> str | None:
        return self.store.get_setting(_BASE_MODEL)
