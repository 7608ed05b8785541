"""A round's share of the pairs (storage.pairs decides what trains) and the rows TRL reads.

``cap_shares`` keeps any one person's share of a round within a bound; ``trl_rows`` gives
DPOTrainer its columns and the cut flags trainer.ipo reads.
"""

from __future__ import annotations

from typing import Any


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
