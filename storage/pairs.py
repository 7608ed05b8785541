"""What trains: the one rule that turns the vote log into preference pairs, used by every round
(trainer.rounds) and by the dataset export (storage.export), so that the ``preferences`` config
is exactly what PrefLoop's own rounds train on.

- The current vote of each pair counts (a changed vote supersedes the old one; the caller passes
  ``VoteStore.votes_with_pairs()``, which returns current votes only).
- A vote of an excluded person, and a repeat shown to measure agreement, train nothing.
- An AI judge's vote trains only where an admin included that judge, except while rounds
  bootstrap on judges (an admin's setting: until N usable votes of people exist, a round trains
  on the judges' votes alone, as a distilled round 0, and its gate scores people's held-out votes
  where there are any; then on people's).
- left / right: one pair. A tie: both orderings (IPO regresses the length-normalised log-ratio gap
  to 1/(2 beta) for each, so the two targets cancel and the optimum for p = 1/2 is a zero margin).
  Both bad: nothing (it says nothing about the order).
- An answer vLLM cut at max_tokens (finish reason "length") is kept and flagged ``chosen_cut`` /
  ``rejected_cut``: trainer.ipo leaves the chat template's turn end off it, so a round never
  teaches the model to end its turn where it was only stopped.
- A stable slice of prompts (a hash of the prompt, ``heldout_fraction`` of them) is held out: its
  pairs with a preference are the gate's test set (the ``test`` split); its ties are neither
  trained on nor scored (a tie would pull accuracy towards 1/2).

A round trains on the pairs of votes no earlier round consumed, within its per-person cap
(trainer.data.cap_shares): the cap defers votes to a later round, it never drops them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

HELDOUT_SALT = "prefloop-heldout-v1"
HELDOUT_FRACTION = 0.1  # the default share of prompts held out for the gate (RoundConfig, export)


def message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def is_heldout(prompt: list[dict[str, str]], fraction: float) -> bool:
    """Stable across runs and machines: a hash of the prompt, not of the vote or the clock."""
    if fraction <= 0:
        return False
    key = (HELDOUT_SALT + json.dumps(prompt, sort_keys=True, ensure_ascii=False)).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return bucket < fraction


def vote_to_pairs(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One vote row (storage.votes.VoteStore.votes_with_pairs) -> 0, 1 or 2 TRL pairs."""
    left = (row["answer_left"], row["model_left"], row.get("finish_left") == "length")
    right = (row["answer_right"], row["model_right"], row.get("finish_right") == "length")
    orders = {"left": [(left, right)], "right": [(right, left)], "tie": [(left, right), (right, left)]}
    out = []
    for (chosen, chosen_by, chosen_cut), (rejected, rejected_by, rejected_cut) in orders.get(row["choice"], []):
        out.append({
            "prompt": row["messages"],
            "chosen": message("assistant", chosen),
            "rejected": message("assistant", rejected),
            "vote_id": row["vote_id"],
            "pair_id": row.get("pair_id", ""),
            "annotator": row.get("annotator", ""),
            "choice": row["choice"],
            "chosen_model": chosen_by,
            "rejected_model": rejected_by,
            "chosen_cut": chosen_cut,
            "rejected_cut": rejected_cut,
        })
    return out


PEOPLE, JUDGE, PEOPLE_AND_JUDGE = "people", "judge", "people+judge"  # which votes a round trained on


def counted(row: dict[str, Any]) -> bool:
    """A repeat measures agreement (its original is already counted); an excluded person's votes
    are kept but not trained on."""
    return not row.get("repeat_of") and not row.get("excluded")


def trainable(row: dict[str, Any]) -> bool:
    """Outside a bootstrap: counted, and a judge's vote only where that judge is included."""
    return counted(row) and (not row.get("judge") or bool(row.get("judge_trained")))


def training_rows(rows: Iterable[dict[str, Any]], bootstrap_until: int = 0
                  ) -> tuple[list[dict[str, Any]], str]:
    """The votes a round trains on (every current vote passed in), and their kind: while fewer
    than ``bootstrap_until`` usable votes of people exist, the judges' votes alone (JUDGE);
    otherwise the trainable ones (PEOPLE, or PEOPLE_AND_JUDGE where an included judge's are in)."""
    rows = list(rows)
    if bootstrap_until > 0:
        people = sum(1 for r in rows if not r.get("judge") and trainable(r) and r["choice"] != "both_bad")
        if people < bootstrap_until:
            return [r for r in rows if r.get("judge") and counted(r)], JUDGE
    chosen = [r for r in rows if trainable(r)]
    return chosen, PEOPLE_AND_JUDGE if any(r.get("judge") for r in chosen) else PEOPLE


def build_pairs(rows: Iterable[dict[str, Any]], heldout_fraction: float = HELDOUT_FRACTION,
                bootstrap_until: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Votes (oldest first) -> (train, held-out) pairs, in vote order; a tie's two orderings stay
    together in train, and a held-out tie is in neither."""
    rows = list(rows)
    selected, kind = training_rows(rows, bootstrap_until)
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for row in selected:
        pairs = vote_to_pairs(row)
        if not pairs:
            continue
        if not is_heldout(row["messages"], heldout_fraction):
            train.extend(pairs)
        elif row["choice"] != "tie":
            heldout.extend(pairs)
    if kind == JUDGE:  # a distilled round is judged by people's held-out votes, where there are any
        people = [p for row in rows if not row.get("judge") and trainable(row) and row["choice"] != "tie"
                  and is_heldout(row["messages"], heldout_fraction) for p in vote_to_pairs(row)]
        heldout = people or heldout
    return train, heldout
