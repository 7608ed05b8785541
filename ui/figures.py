"""The Admin tab's figures as tidy DataFrames (one row per point), for Gradio's native plots.

Pure functions of what storage and the round manifests hold, so they are tested without a browser.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from trainer.rounds import heldout_accuracy

STEP_METRICS = {"loss": "loss", "ipo/accuracy": "accuracy (per-token margin > 0)",
                "rewards/accuracies": "accuracy (TRL, summed log-ratios)"}


def votes_over_time(times: Iterable[tuple[float, str]], points: int = 400) -> pd.DataFrame:
    """Cumulative votes by choice and in total: columns time, votes, choice. At most about
    ``points`` points per line (evenly spaced in votes, the last vote always kept): a plot of a
    million votes is as light for the browser as one of a thousand."""
    times = list(times)
    step = max(1, len(times) // points)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for i, (t, choice) in enumerate(times):
        counts[choice] = counts.get(choice, 0) + 1
        if i % step and i != len(times) - 1:
            continue
        when = dt.datetime.fromtimestamp(t)
        shown = counts.items() if step > 1 else [(choice, counts[choice])]  # every vote: the one that moved
        rows.extend({"time": when, "votes": n, "choice": c} for c, n in shown)
        rows.append({"time": when, "votes": i + 1, "choice": "all"})
    return pd.DataFrame(rows, columns=["time", "votes", "choice"])


def read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in row and "step" in row:
            out.append(row)
    return out


def round_steps(manifests: Path, live: tuple[str, list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """Per round and step: loss and accuracies. ``live`` adds the running round's rows so far.
    Columns: step, value, metric, round."""
    series: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(manifests.glob("round-*.metrics.jsonl")):
        series[f.name.removesuffix(".metrics.jsonl")] = read_steps(f)
    if live is not None:
        series[live[0]] = [r for r in live[1] if "loss" in r and "step" in r]
    rows = [
        {"step": r["step"], "value": float(r[key]), "metric": label, "round": name}
        for name, steps in series.items() for r in steps
        for key, label in STEP_METRICS.items() if r.get(key) is not None
    ]
    return pd.DataFrame(rows, columns=["step", "value", "metric", "round"])


def manifests(path: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(path.glob("round-[0-9]*.json")):
        if not f.stem[len("round-"):].isdigit():
            continue  # round-0001.spec.json: the round's input, beside its manifest
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:
            continue
    return out


def manifest_accuracy(m: dict[str, Any]) -> float | None:
    loss = ((m.get("config") or {}).get("train") or {}).get("loss", "ipo")
    return heldout_accuracy(m.get("metrics") or {}, loss)


def by_round(rounds: list[dict[str, Any]]) -> pd.DataFrame:
    """Held-out accuracy and KL to the reference per round: columns round, value, metric."""
    rows = []
    for m in rounds:
        metrics = m.get("metrics") or {}
        label = f"{m['round']}"
        acc = manifest_accuracy(m)
        if acc is not None:
            rows.append({"round": label, "value": acc, "metric": "held-out accuracy"})
        if metrics.get("kl_per_token") is not None:
            rows.append({"round": label, "value": metrics["kl_per_token"], "metric": "KL to reference (nats/token)"})
    return pd.DataFrame(rows, columns=["round", "value", "metric"])


def win_rates(rates: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """Win rate vs the base with its 95% bootstrap interval: columns version, win rate, series."""
    rows = []
    for version, (est, lo, hi) in sorted(rates.items()):
        for series, v in (("95% low", lo), ("estimate", est), ("95% high", hi)):
            rows.append({"version": version, "win rate": v, "series": series})
    return pd.DataFrame(rows, columns=["version", "win rate", "series"])
