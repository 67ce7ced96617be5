"""Training several optimizers side by side on one task, and what their loss curves say.

All runs start from the same weights and see the same batches in the same order. They advance in
lockstep, one training step each per round, in an order rotated every round, so a slow spell of a
shared machine is spread over all of them. Only the training step (zero_grad, forward, backward,
``step()``) is timed; evaluation is not.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .timing import synchronize


@dataclass
class Run:
    key: str
    label: str
    lr: float
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    seconds: float = 0.0
    curve: List[Dict[str, float]] = field(default_factory=list)  # {"step", "seconds", "loss", ...}
    pending_train: List[float] = field(default_factory=list)
    error: Optional[str] = None
    diverged_at: Optional[int] = None
    seed: int = 0  # of the initial weights and the batch order this run saw

    @property
    def active(self) -> bool:
        return self.error is None and self.diverged_at is None


def warmup_cosine(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """lr multiplier for 0-based step ``s``: linear warm-up, then cosine decay to 0 at ``steps``."""
    warmup = int(round(warmup_fraction * steps))

    def multiplier(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    return multiplier


def train_interleaved(
    runs: List[Run],
    *,
    steps: int,
    batch_at: Callable[[int], Any],
    loss_of: Callable[[nn.Module, Any], torch.Tensor],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    eval_every: int,
    schedule: Callable[[int], float],
    device: torch.device,
    progress=None,
) -> None:
    """Train every run for ``steps`` steps; append evaluations (at step 0, every ``eval_every``, last)."""
    for run in runs:
        if run.active:
            run.curve.append({"step": 0, "seconds": 0.0, **evaluate(run.model)})
    for step in range(steps):
        batch = batch_at(step)
        multiplier = schedule(step)
        active = [run for run in runs if run.active]
        shift = step % len(active) if active else 0
        for run in active[shift:] + active[:shift]:
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr * multiplier
            synchronize(device)
            started = time.perf_counter()
            try:
                run.optimizer.zero_grad(set_to_none=True)
                loss = loss_of(run.model, batch)
                loss.backward()
                run.optimizer.step()
                synchronize(device)
            except Exception as error:
                run.error = f"{type(error).__name__}: {error} (at step {step + 1})"
                continue
            run.seconds += time.perf_counter() - started
            value = loss.item()
            if not math.isfinite(value):
                run.diverged_at = step + 1
                continue
            run.pending_train.append(value)
        done = step + 1
        if done % eval_every == 0 or done == steps:
            for run in runs:
                if run.active:
                    train = sum(run.pending_train) / len(run.pending_train) if run.pending_train else float("nan")
                    run.pending_train.clear()
                    run.curve.append({"step": done, "seconds": run.seconds, "train_loss": train, **evaluate(run.model)})
        if progress is not None:
            progress.update(1)


# ------------------------------------------------------------------------------------- metrics
def first_reaching(curve: List[Dict[str, float]], target: float, metric: str = "loss") -> Optional[Dict[str, float]]:
    """The first evaluation whose ``metric`` is at or below ``target``, or None."""
    for point in curve:
        if point[metric] <= target:
            return point
    return None


def value_at_seconds(curve: List[Dict[str, float]], seconds: float, metric: str = "loss") -> Optional[Dict[str, float]]:
    """The last evaluation taken within ``seconds`` of training time."""
    within = [point for point in curve if point["seconds"] <= seconds * (1 + 1e-9)]
    return within[-1] if within else None


def final_value(run: Run, metric: str = "loss") -> float:
    """The last evaluation's ``metric``; +inf for a run that failed or diverged (so it never wins)."""
    if not run.active or not run.curve:
        return math.inf
    value = run.curve[-1][metric]
    return value if math.isfinite(value) else math.inf


def best_per_optimizer(runs: List[Run], metric: str = "loss") -> Dict[str, Run]:
    """Each optimizer's run with the lowest final ``metric`` (one run each unless lr was swept)."""
    best: Dict[str, Run] = {}
    for run in runs:
        if run.key not in best or final_value(run, metric) < final_value(best[run.key], metric):
            best[run.key] = run
    return best


def summarize(
    runs: List[Run],
    baseline: str,
    *,
    steps: int,
    target: Optional[float] = None,
    metric: str = "loss",
    extra: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Per-optimizer summary of the best-lr runs.

    ``target`` None: the baseline's final ``metric`` (the question is how many steps each optimizer
    needs to match AdamW's result). Steps and seconds to the target are read at evaluation points, so
    their resolution is the evaluation interval.
    """
    best = best_per_optimizer(runs, metric)
    reference = best.get(baseline)
    if target is None and reference is not None and math.isfinite(final_value(reference, metric)):
        target = final_value(reference, metric)
    reference_hit = first_reaching(reference.curve, target, metric) if reference and target is not None else None
    reference_seconds = reference.seconds if reference is not None and reference.active else None

    table: Dict[str, Any] = {}
    for key, run in best.items():
        entry: Dict[str, Any] = {
            "label": run.label,
            "lr": run.lr,
            "final": final_value(run, metric) if run.active else None,
            "best": min((p[metric] for p in run.curve), default=None),
            "train_seconds": run.seconds,
            "ms_per_step": 1e3 * run.seconds / steps if run.active else None,
            "error": run.error,
            "diverged_at": run.diverged_at,
        }
        for name in extra or []:
            entry[name] = run.curve[-1].get(name) if run.active and run.curve else None
        hit = first_reaching(run.curve, target, metric) if target is not None and run.active else None
        entry["steps_to_target"] = None if hit is None else hit["step"]
        entry["seconds_to_target"] = None if hit is None else hit["seconds"]
        entry["fraction_of_baseline_steps"] = (
            hit["step"] / reference_hit["step"] if hit is not None and reference_hit and reference_hit["step"] else None
        )
        if reference_seconds is not None and run.active:
            at = value_at_seconds(run.curve, reference_seconds, metric)
            entry["at_baseline_seconds"] = None if at is None else at[metric]
            entry["at_baseline_seconds_step"] = None if at is None else at["step"]
        table[key] = entry
    return {
        "metric": metric,
        "target": target,
        "baseline_seconds": reference_seconds,
        "optimizers": table,
        "runs": [
            {
                "key": r.key,
                "lr": r.lr,
                "seconds": r.seconds,
                "error": r.error,
                "diverged_at": r.diverged_at,
                "curve": columns(thin(r.curve, MAX_STORED_POINTS)),
            }
            for r in runs
        ],
    }


MAX_STORED_POINTS = 250  # per curve in results.json; the summaries above use every evaluation


def thin(curve: List[Dict[str, float]], limit: int) -> List[Dict[str, float]]:
    """At most about ``limit`` evenly spaced points, always keeping the first and the last."""
    if len(curve) <= limit:
        return curve
    stride = math.ceil(len(curve) / limit)
    kept = curve[::stride]
    return kept if kept[-1] is curve[-1] else kept + [curve[-1]]


def columns(curve: List[Dict[str, float]]) -> Dict[str, List[float]]:
    """{"step": [...], "seconds": [...], "loss": [...], ...}: one list per measured quantity."""
    names = list(dict.fromkeys(name for point in curve for name in point))
    return {name: [point.get(name) for point in curve] for name in names}
