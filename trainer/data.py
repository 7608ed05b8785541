"""Votes -> TRL conversational preference pairs, with a deterministic held-out slice.

A left/right vote gives one pair. A tie gives both orderings: IPO regresses the
(length-normalised) log-ratio gap to 1/(2*beta) for each ordering, so the two targets cancel and
the optimum for p = 1/2 is a zero margin. "Both bad" says nothing about the order: dropped.

An answer vLLM cut at max_tokens (finish reason "length") carries ``chosen_cut`` / ``rejected_cut``:
the trainer leaves the chat template's turn end off it (trainer.ipo), so a round never teaches the
model to end its turn where it was only stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

HELDOUT_SALT = "prefloop-heldout-v1"


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
        out.append(
            {
                "prompt": row["messages"],
                "chosen": message("assistant", chosen),
                "rejected": message("assistant", rejected),
                "vote_id": row["vote_id"],
                "annotator": row.get("annotator", ""),
                "choice": row["choice"],
                "chosen_model": chosen_by,
                "rejected_model": rejected_by,
                "chosen_cut": chosen_cut,
                "rejected_cut": rejected_cut,
            }
        )
    return out


def trainable(row: dict[str, Any]) -> bool:
    """A repeat measures agreement (its original is already counted); an excluded person's votes
    are kept but not trained on."""
    return not row.get("repeat_of") and not row.get("excluded")


def build_pairs(
    rows: Iterable[dict[str, Any]], heldout_fraction: float = 0.1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split votes into (train, heldout) pair lists; both orderings of a tie stay together."""
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for row in rows:
        if not trainable(row):
            continue
        pairs = vote_to_pairs(row)
        if pairs:
            (heldout if is_heldout(row["messages"], heldout_fraction) else train).extend(pairs)
    return train, heldout


def cap_shares(pairs: list[dict[str, Any]], max_share: float, uncapped: set[str] | frozenset[str] = frozenset()
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep each person's share of ``pairs`` at most ``max_share``; returns (kept, held back per person).

    The allowance x (pairs per capped person) is the largest with x <= max_share * (pairs kept in
    all), where uncapped people's pairs all count. Each capped person keeps their oldest votes
    within x (a tie's two orderings stay together); the rest wait for a later round. With fewer
    than 1/max_share capped people and no uncapped ones, nothing can be kept: a round then needs
    more people, which is the point.
    """
    if max_share >= 1:
        return pairs, {}
    votes: dict[int, list[dict[str, Any]]] = {}
    for p in pairs:
        votes.setdefault(p["vote_id"], []).append(p)
    by_person: dict[str, list[list[dict[str, Any]]]] = {}
    for group in votes.values():
        by_person.setdefault(group[0].get("annotator", ""), []).append(group)
    free = sum(len(g) for person, groups in by_person.items() if person in uncapped for g in groups)
    sizes = {person: sum(len(g) for g in groups) for person, groups in by_person.items() if person not in uncapped}

    def select(allowance: int) -> tuple[set[int], dict[str, int], dict[str, int]]:
        kept_votes: set[int] = set()
        used: dict[str, int] = {}
        held: dict[str, int] = {}
        for person, groups in by_person.items():
            for group in sorted(groups, key=lambda g: g[0]["vote_id"]):
                n = len(group)
                if person in uncapped or used.get(person, 0) + n <= allowance:
                    kept_votes.add(group[0]["vote_id"])
                    used[person] = used.get(person, 0) + n
                else:
                    held[person] = held.get(person, 0) + n
        return kept_votes, used, held

    for x in range(max(sizes.values(), default=0), -1, -1):
        if x > max_share * (free + sum(min(n, x) for n in sizes.values())):
            continue
        kept_votes, used, held = select(x)
        total = sum(used.values())
        # a tie's two pairs may not fit the allowance exactly: check the shares actually kept
        if all(used.get(p, 0) <= max_share * total for p in sizes):
            return [p for p in pairs if p["vote_id"] in kept_votes], held
    kept_votes, _, held = select(0)
    return [p for p in pairs if p["vote_id"] in kept_votes], held


TRL_COLUMNS = ("prompt", "chosen", "rejected")
CUT_COLUMNS = ("chosen_cut", "rejected_cut")


def trl_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The columns DPOTrainer reads, and the cut flags trainer.ipo reads (False where unknown:
    imported pairs, votes from before finish reasons were stored)."""
    return [{**{k: p[k] for k in TRL_COLUMNS}, **{k: bool(p.get(k)) for k in CUT_COLUMNS}} for p in pairs]
