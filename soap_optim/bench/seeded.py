"""Training a task's optimizers over several seeds, and what the seeds say together.

For each seed, every (optimizer, hyperparameters) pair starts from that seed's weights and sees that
seed's batches, in one interleaved group (:func:`~.training.train_interleaved`), so within a seed the
runs are comparable step by step and second by second. :func:`aggregate` turns the runs into per-pair
means with 95% intervals: final loss, steps and seconds to the target, and those as fractions of the
reference's (paired: seed by seed, then averaged).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .optimizers import Hyper, OptimizerSpec
from .problems import Task
from .progress import Progress
from .stats import compare, interval
from .training import Run, final_value, first_reaching, train_interleaved

Pair = Tuple[OptimizerSpec, Hyper]


def pairs(specs: Sequence[OptimizerSpec], hypers: Sequence[Hyper]) -> List[Pair]:
    return [(spec, hyper) for hyper in hypers for spec in specs]


def make_runs(chosen: Sequence[Pair], base, seed: int = 0) -> List[Run]:
    """One run per pair, each on its own copy of ``base``; a constructor that raises gives a failed run."""
    runs = []
    for spec, hyper in chosen:
        model = copy.deepcopy(base)
        try:
            optimizer, error = spec.build(model, hyper), None
        except Exception as failure:
            optimizer, error = None, f"{type(failure).__name__}: {failure}"
        runs.append(Run(spec.key, spec.label, hyper.lr, model, optimizer, error=error, seed=seed))
    return runs


def train_seed(task: Task, chosen: Sequence[Pair], seed: int, device, progress=None) -> List[Run]:
    problem = task.build(seed)
    runs = make_runs(chosen, problem.base, seed)
    train_interleaved(
        runs,
        steps=task.steps,
        batch_at=problem.batch_at,
        loss_of=problem.loss_of,
        evaluate=problem.evaluate,
        eval_every=task.eval_every,
        schedule=task.schedule,
        device=device,
        progress=progress,
    )
    for run in runs:  # the models are not needed any more; a run over many seeds would keep them all
        run.model = None
        run.optimizer = None
    return runs


def train_seeds(task: Task, chosen: Sequence[Pair], seeds: Sequence[int], device, label: str, show: bool) -> List[Run]:
    runs: List[Run] = []
    with Progress(task.steps * len(seeds), label, show) as bar:
        for seed in seeds:
            runs += train_seed(task, chosen, seed, device, bar)
    return runs


def group(runs: Sequence[Run]) -> Dict[Tuple[str, float], List[Run]]:
    """Runs by (optimizer key, lr), in order of first appearance, each list in seed order."""
    groups: Dict[Tuple[str, float], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.key, run.lr), []).append(run)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


def _last(run: Run, name: str) -> Optional[float]:
    return run.curve[-1].get(name) if run.active and run.curve else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def band(runs: Sequence[Run], metric: str = "loss") -> Dict[str, List[Optional[float]]]:
    """Mean and 95% interval of ``metric`` at each evaluation step over the active runs; mean seconds there."""
    active = [r for r in runs if r.active and r.curve]
    if not active:
        return {"step": [], "seconds": [], "mean": [], "low": [], "high": []}
    points = min(len(r.curve) for r in active)
    out: Dict[str, List[Optional[float]]] = {"step": [], "seconds": [], "mean": [], "low": [], "high": []}
    for i in range(points):
        spread = interval([r.curve[i][metric] for r in active])
        out["step"].append(active[0].curve[i]["step"])
        out["seconds"].append(sum(r.curve[i]["seconds"] for r in active) / len(active))
        out["mean"].append(spread.mean)
        out["low"].append(spread.low)
        out["high"].append(spread.high)
    return out


def aggregate(
    runs: Sequence[Run],
    reference: Tuple[str, float],
    *,
    target: Optional[float] = None,
    metric: str = "loss",
    extra: Sequence[str] = (),
) -> Dict[str, Any]:
    """Per (optimizer, lr) over seeds, against the ``reference`` (key, lr) pair on the same seeds.

    ``target`` None: each seed's target is the reference's final ``metric`` on that seed. A failed or
    diverged run counts as not reaching the target and has no final value; ``reached`` says how many
    seeds did, and the step and seconds intervals are over those.
    """
    groups = group(runs)
    if reference not in groups:
        raise ValueError(f"no runs of the reference {reference} among {list(groups)}")
    ref_by_seed = {r.seed: r for r in groups[reference]}
    targets = {s: target if target is not None else final_value(r, metric) for s, r in ref_by_seed.items()}
    ref_hits = {s: first_reaching(r.curve, targets[s], metric) if r.active and math.isfinite(targets[s]) else None
                for s, r in ref_by_seed.items()}
    ref_final = interval([final_value(r, metric) for r in groups[reference]])
    table: Dict[str, Any] = {}
    for (key, lr), members in groups.items():
        hits = [first_reaching(r.curve, targets[r.seed], metric) if r.active and math.isfinite(targets.get(r.seed, math.inf)) else None
                for r in members]
        refs = [ref_hits.get(r.seed) for r in members]
        final = interval([final_value(r, metric) for r in members])
        steps_fraction = interval([_ratio(h and h["step"], g and g["step"]) for h, g in zip(hits, refs)])
        seconds_fraction = interval([_ratio(h and h["seconds"], g and g["seconds"]) for h, g in zip(hits, refs)])
        entry = {
            "key": key,
            "label": members[0].label,
            "lr": lr,
            "seeds": [r.seed for r in members],
            "final": final.as_dict(),
            "final_per_seed": [final_value(r, metric) for r in members],
            "vs_reference": None if (key, lr) == reference else compare(final, ref_final),
            "steps_to_target": interval([h and h["step"] for h in hits]).as_dict(),
            "seconds_to_target": interval([h and h["seconds"] for h in hits]).as_dict(),
            "fraction_of_reference_steps": steps_fraction.as_dict(),
            "fraction_of_reference_seconds": seconds_fraction.as_dict(),
            "reached": sum(h is not None for h in hits),
            "ms_per_step": interval([1e3 * r.seconds / max(1, r.curve[-1]["step"]) if r.active and r.curve else None
                                     for r in members]).as_dict(),
            "failures": [r.error or f"diverged at step {r.diverged_at}" for r in members if not r.active],
            "band": band(members, metric),
        }
        for name in [*extra, "val_loss"]:
            if any(_last(r, name) is not None for r in members):
                entry[name] = interval([_last(r, name) for r in members]).as_dict()
        table[f"{key}@{lr:g}"] = entry
    return {
        "reference": f"{reference[0]}@{reference[1]:g}",
        "metric": metric,
        "target": target,
        "targets_per_seed": [targets[s] for s in sorted(targets)],
        "optimizers": table,
    }
