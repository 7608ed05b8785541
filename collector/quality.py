"""Human-side figures: Bradley-Terry strengths of adapter versions from arena votes, and
per-annotator quality (position bias, tie rate, speed).

Bradley-Terry: P(i beats j) = p_i / (p_i + p_j), fitted by Hunter's MM iterations; a tie counts
as half a win for each side (the convention of Chatbot Arena's leaderboard). Intervals come from
a bootstrap over votes.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from storage.votes import SWAPPED

Outcome = tuple[str, str, float]  # (model a, model b, score of a: 1 win, 0.5 tie, 0 loss)


def outcomes_from_votes(rows: Iterable[dict]) -> list[Outcome]:
    """People's arena votes (left/right/tie between two different models) -> outcomes; both-bad is
    skipped, and so are AI judges' votes: the win rates are people's verdict."""
    score = {"left": 1.0, "right": 0.0, "tie": 0.5}
    return [(r["model_left"], r["model_right"], score[r["choice"]]) for r in rows
            if r["choice"] in score and r["model_left"] != r["model_right"] and not r.get("judge")]


def _tally(outcomes: Iterable[Outcome]) -> Counter:
    """Outcomes -> how many times each (a, b, score) occurred: the fits below cost the number of
    distinct outcomes (a few per pair of versions), not the number of votes."""
    return Counter(outcomes)


def bradley_terry(outcomes: list[Outcome] | Counter, iters: int = 500, tol: float = 1e-10) -> dict[str, float]:
    """Strengths normalised to a geometric mean of 1 ({} without outcomes). ``outcomes``: a list, or
    a Counter of them (weights)."""
    tally = outcomes if isinstance(outcomes, Counter) else _tally(outcomes)
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for (a, b, s), n in tally.items():
        if n <= 0:
            continue
        wins[a] += s * n
        wins[b] += (1 - s) * n
        games[(a, b)] += n
        games[(b, a)] += n
    if not games:
        return {}
    players = sorted(wins)
    opponents: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (a, j), n in games.items():
        opponents[a].append((j, n))
    p = {i: 1.0 for i in players}
    for _ in range(iters):
        new = {}
        for i in players:
            denom = sum(n / (p[i] + p[j]) for j, n in opponents[i])
            new[i] = max(wins[i], 1e-9) / denom if denom else p[i]
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        new = {i: v / g for i, v in new.items()}
        done = max(abs(new[i] - p[i]) for i in players) < tol
        p = new
        if done:
            break
    return p


def win_rate_vs(strengths: dict[str, float], model: str, anchor: str) -> float:
    return strengths[model] / (strengths[model] + strengths[anchor])


def win_rates_with_intervals(outcomes: list[Outcome], anchor: str = "base", samples: int = 200,
                             seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Each version's win rate against ``anchor``: (estimate, 2.5th, 97.5th percentile). The
    bootstrap resamples votes with replacement, drawn as one multinomial over the distinct
    outcomes (the same distribution as drawing n votes one by one, at the cost of a few)."""
    import numpy as np

    tally = _tally(outcomes)
    point = bradley_terry(tally)
    if anchor not in point:
        return {}
    keys = list(tally)
    counts = np.array([tally[k] for k in keys], dtype=float)
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = defaultdict(list)
    for _ in range(samples):
        drawn = rng.multinomial(n, counts / n)
        s = bradley_terry(Counter({k: int(c) for k, c in zip(keys, drawn, strict=True) if c}), iters=200, tol=1e-8)
        for m in s:
            if m != anchor and anchor in s:
                boot[m].append(win_rate_vs(s, m, anchor))
    out = {}
    for m in point:
        if m == anchor:
            continue
        qs = sorted(boot[m]) or [win_rate_vs(point, m, anchor)]
        out[m] = (win_rate_vs(point, m, anchor), qs[int(0.025 * (len(qs) - 1))], qs[int(0.975 * (len(qs) - 1))])
    return out


def binomial_two_sided_p(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test: P(a count at least as unlikely as k). The pmf is computed
    in logs (lgamma), so it holds for any number of votes: C(n, i) as a float overflows past n ~ 1,030."""
    if n == 0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
               for i in range(n + 1)]
    bound = log_pmf[k] + 1e-9
    return min(1.0, sum(math.exp(x) for x in log_pmf if x <= bound))


@dataclass
class AnnotatorQuality:
    annotator: str
    votes: int
    left_share: float
    left_p_value: float
    tie_rate: float
    median_seconds: float | None
    repeats: int = 0
    agreement: float | None = None
    kappa: float | None = None
    excluded: bool = False

    @property
    def position_biased(self) -> bool:
        """Picks one side far more than chance allows (p < 0.01)."""
        return self.left_p_value < 0.01


CATEGORIES = ("left", "right", "tie", "both_bad")


def repeat_judgements(rows: Iterable[dict]) -> list[tuple[str, str, str, str]]:
    """(original annotator, original choice, repeat annotator, repeat choice) for every voted
    repeat, with the repeat's choice mapped back to the original's sides when they were swapped."""
    rows = list(rows)
    by_pair = {r["pair_id"]: r for r in rows if "pair_id" in r}
    out = []
    for r in rows:
        original = by_pair.get(r.get("repeat_of") or "")
        if original is None:
            continue
        choice = SWAPPED[r["choice"]] if r.get("repeat_swapped") else r["choice"]
        out.append((original["annotator"], original["choice"], r["annotator"], choice))
    return out


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over the four choices: (observed - chance) / (1 - chance),
    chance from each rater's own marginals. None without pairs; 1.0 when chance is already 1."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    chance = sum(first[c] * second[c] for c in CATEGORIES) / n**2
    if chance >= 1.0:
        return 1.0
    return (observed - chance) / (1 - chance)


def annotator_quality(rows: Iterable[dict]) -> list[AnnotatorQuality]:
    """Per annotator, from vote rows (storage.votes.VoteStore.votes_with_pairs). Agreement and
    kappa count every repeat a person took part in, as the original's voter or the repeat's, with
    another person (an AI judge's comparisons are judge_agreement's)."""
    rows = list(rows)
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["annotator"]].append(r)
    judges = {r["annotator"] for r in rows if r.get("judge")}  # measured against people in judge_agreement
    involved: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, ca, b, cb in repeat_judgements(rows):
        if a in judges or b in judges:
            continue
        involved[a].append((ca, cb))
        if b != a:
            involved[b].append((ca, cb))
    out = []
    for who, rs in sorted(by.items()):
        sided = [r for r in rs if r["choice"] in ("left", "right")]
        left = sum(r["choice"] == "left" for r in sided)
        secs = [r["latency_ms"] / 1000 for r in rs if r.get("latency_ms") is not None]
        out.append(AnnotatorQuality(
            annotator=who, votes=len(rs), left_share=left / len(sided) if sided else 0.5,
            left_p_value=binomial_two_sided_p(left, len(sided)),
            tie_rate=sum(r["choice"] == "tie" for r in rs) / len(rs),
            median_seconds=statistics.median(secs) if secs else None,
            repeats=len(involved[who]),
            agreement=sum(a == b for a, b in involved[who]) / len(involved[who]) if involved[who] else None,
            kappa=cohen_kappa(involved[who]), excluded=any(r.get("excluded") for r in rs),
        ))
    return out


def win_rate_vs_base(rows: Iterable[dict], version: str, samples: int = 200) -> tuple[float, float, float] | None:
    """People's win rate of ``version`` against the base from arena votes: (estimate, 2.5th, 97.5th
    percentile), or None before any arena vote compared them."""
    return win_rates_with_intervals(outcomes_from_votes(rows), anchor="base", samples=samples).get(version)


# -- AI judges against people --------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float] | None:
    """A share k/n with its Wilson score interval (95% by default): sound at small n and at 0 or 1,
    where the normal approximation is not. None when n is 0."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class JudgeAgreement:
    """One judge's (or person's) agreement with the other kind, on pairs both voted on (a pair
    shown again across the two kinds), in the two ways MT-Bench reports it: with ties (left,
    right and tie as three classes) and without (pairs where both picked a side). Both-bad votes
    say nothing about the order and are left out. ``inconsistent``: the share of a judge's votes
    whose two orders disagreed (a tie was stored); ``first_position``: of those, the share where it
    picked the first answer shown both times (position bias), as (share, low, high)."""

    who: str
    judge: bool
    agreed: int = 0
    compared: int = 0
    agreed_sided: int = 0
    compared_sided: int = 0
    inconsistent: tuple[float, float, float] | None = None
    first_position: tuple[float, float, float] | None = None

    @property
    def with_ties(self) -> tuple[float, float, float] | None:
        return wilson(self.agreed, self.compared)

    @property
    def without_ties(self) -> tuple[float, float, float] | None:
        return wilson(self.agreed_sided, self.compared_sided)

    def add(self, mine: str, theirs: str) -> None:
        if "both_bad" in (mine, theirs):
            return
        self.compared += 1
        self.agreed += mine == theirs
        if "tie" not in (mine, theirs):
            self.compared_sided += 1
            self.agreed_sided += mine == theirs


PEOPLE_WITH_PEOPLE = "people with each other"


def judge_agreement(rows: Iterable[dict]) -> list[JudgeAgreement]:
    """Per judge (against every person) and per person (against every judge), from vote rows with
    their ``judge`` mark (storage.votes.VoteStore.vote_facts); a last row, people with each other
    on the same footing, for reference. Judges first."""
    rows = list(rows)
    judges = {r["annotator"] for r in rows if r.get("judge")}
    if not judges:
        return []
    out: dict[str, JudgeAgreement] = {}
    between_people = JudgeAgreement(PEOPLE_WITH_PEOPLE, judge=False)
    for a, ca, b, cb in repeat_judgements(rows):
        if (a in judges) == (b in judges):
            if a not in judges and a != b:
                between_people.add(ca, cb)
            continue
        out.setdefault(a, JudgeAgreement(a, a in judges)).add(ca, cb)
        out.setdefault(b, JudgeAgreement(b, b in judges)).add(cb, ca)
    for judge in judges:
        row = out.setdefault(judge, JudgeAgreement(judge, True))
        orders = [r["judge_orders"].split(",") for r in rows
                  if r["annotator"] == judge and r.get("judge_orders") and "," in r["judge_orders"]]
        split = [o for o in orders if o[0] != o[1]]
        row.inconsistent = wilson(len(split), len(orders))
        row.first_position = wilson(sum(o == ["left", "right"] for o in split), len(split))
    ordered = sorted(out.values(), key=lambda x: (not x.judge, x.who))
    return ordered + ([between_people] if between_people.compared else [])
