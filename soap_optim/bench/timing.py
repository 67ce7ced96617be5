"""Step time and optimizer-state memory, measured interleaved.

Every optimizer gets its own copy of one model and the same fixed synthetic gradients (a small
pool, cycled, so the preconditioners see more than one direction). After a warm-up, the optimizers
take turns, one ``step()`` each per round, with the order rotated every round: a slow spell of a
shared machine then hits every optimizer alike instead of whichever ran during it.

Optimizers with a preconditioner refresh every ``period`` steps get three numbers: the median
non-refresh step, the median refresh step (the position within the period whose median time is
largest, which is where the refresh falls whatever a library's step counting), and the amortized
step, the mean over one period of each position's median (see :func:`split_by_refresh`).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .optimizers import BASELINE, Hyper, OptimizerSpec

GRADIENT_POOL = 4  # distinct synthetic gradients, cycled


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state: every tensor reachable from ``optimizer.state`` (through
    dicts, lists, tuples and the attributes of helper objects, as some libraries keep their
    preconditioners in), each underlying storage counted once."""
    seen_storages = set()
    seen_objects = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr(), storage.nbytes())
            if key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
            return
        if value is None or isinstance(value, (bool, int, float, str, bytes, type)) or callable(value):
            return
        if id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, dict):
            items = list(value.values())
        elif isinstance(value, (list, tuple, set)):
            items = list(value)
        else:
            items = list(getattr(value, "__dict__", {}).values())
            items += [getattr(value, slot) for slot in getattr(type(value), "__slots__", ()) if hasattr(value, slot)]
        for item in items:
            visit(item)

    for param_state in optimizer.state.values():
        visit(param_state)
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_by_refresh(times: List[float], period: Optional[int]) -> Dict[str, Optional[float]]:
    """Summaries of step times (seconds) measured over whole periods, starting at a period boundary.

    ``amortized`` is the mean over one period of each position's median: what a step costs on
    average, refresh included, without letting a few steps slowed by other programs dominate it as
    they would a plain mean (``mean``, also returned).
    """
    mean = statistics.fmean(times)
    if not period or period < 2:
        median = statistics.median(times)
        return {"median": median, "refresh": None, "amortized": median, "mean": mean}
    by_phase = [times[phase::period] for phase in range(period)]
    medians = [statistics.median(phase_times) for phase_times in by_phase]
    refresh_phase = max(range(period), key=medians.__getitem__)
    others = [t for phase, phase_times in enumerate(by_phase) if phase != refresh_phase for t in phase_times]
    return {
        "median": statistics.median(others),
        "refresh": medians[refresh_phase],
        "amortized": statistics.fmean(medians),
        "mean": mean,
    }


def plan_calls(specs: List[OptimizerSpec], hyper: Hyper, warmup: int, periods: int) -> Tuple[int, int]:
    """(warm-up calls, measured calls): both whole periods of every optimizer, so the measured window
    starts on a period boundary of each and covers ``periods`` periods of the longest."""
    cycle = math.lcm(*[spec.period(hyper) or 1 for spec in specs])
    warmup = cycle * math.ceil(max(warmup, 1) / cycle)
    measured = cycle * max(1, math.ceil(periods * max(spec.period(hyper) or 1 for spec in specs) / cycle))
    return warmup, measured


def measure_steps(
    specs: List[OptimizerSpec],
    model_factory: Callable[[], nn.Module],
    hyper: Hyper,
    *,
    warmup: int,
    periods: int,
    device: torch.device,
    seed: int,
    progress=None,
) -> Dict[str, Any]:
    """Time ``step()`` of every optimizer, interleaved; returns per-optimizer results in ms and bytes."""
    torch.manual_seed(seed)
    base = model_factory().to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    pool = [
        [(torch.randn(p.shape, generator=generator) * 1e-2).to(device) for p in base.parameters()]
        for _ in range(GRADIENT_POOL)
    ]
    warmup, measured = plan_calls(specs, hyper, warmup, periods)

    runs: Dict[str, Dict[str, Any]] = {}
    results: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        model = copy.deepcopy(base)
        params = list(model.parameters())
        for p, g in zip(params, pool[0]):
            p.grad = g.clone()
        try:
            runs[spec.key] = {"optimizer": spec.build(model, hyper), "params": params, "times": []}
        except Exception as error:
            results[spec.key] = {"error": f"{type(error).__name__}: {error}"}

    total_calls = warmup + measured
    for call in range(total_calls):
        keys = list(runs)
        shift = call % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            run = runs[key]
            for p, g in zip(run["params"], pool[call % GRADIENT_POOL]):
                if p.grad is None:  # heavyball frees the gradients in step()
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            synchronize(device)
            started = time.perf_counter()
            try:
                run["optimizer"].step()
                synchronize(device)
            except Exception as error:
                results[key] = {"error": f"{type(error).__name__}: {error} (at step call {call + 1})"}
                del runs[key]
                continue
            if call >= warmup:
                run["times"].append(time.perf_counter() - started)
        if progress is not None:
            progress.update(1)

    for spec in specs:
        if spec.key not in runs:
            continue
        run = runs[spec.key]
        summary = split_by_refresh(run["times"], spec.period(hyper))
        results[spec.key] = {
            "median_ms": 1e3 * summary["median"],
            "refresh_ms": None if summary["refresh"] is None else 1e3 * summary["refresh"],
            "amortized_ms": 1e3 * summary["amortized"],
            "mean_ms": 1e3 * summary["mean"],
            "refresh_period": spec.period(hyper),
            "state_bytes": state_nbytes(run["optimizer"]),
            "measured_steps": len(run["times"]),
        }
    _add_ratios(results)
    return {
        "warmup_steps": warmup,
        "measured_steps": measured,
        "parameters": sum(p.numel() for p in base.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
        "results": results,
    }


def _add_ratios(results: Dict[str, Dict[str, Any]]) -> None:
    base = results.get(BASELINE, {})
    for result in results.values():
        if "error" in result:
            continue
        for name in ("median_ms", "amortized_ms", "state_bytes"):
            denominator = base.get(name)
            result[name.split("_")[0] + "_ratio"] = result[name] / denominator if denominator else None
