"""What SOAP's eigenbasis refresh costs against its plain step, and what ``refresh_tolerance`` saves.

Trains the benchmark's byte-level GPT (default: width 128, depth 4, the size where the refresh cost was
reported) on the standard-library text with each optimizer arm, interleaved step by step (the order
rotating every step, so a busy spell of the machine hits every arm alike), and times ``optimizer.step()``
alone. Real gradients matter here: how often a basis drifts past the tolerance depends on them. Reported
per arm: the median step that refreshes nothing, the median step with a due refresh, the amortized step
(median plain step and mean refresh step, weighted by their counts, the refresh steps
without outliers above 3x their median), the amortized one as a multiple of AdamW's median step; and the final training loss (mean of the last 10 steps).

    python benchmarks/refresh_cost.py --steps 120 --out refresh_cost.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any, Dict, List

import torch

import soap_optim
from soap_optim.bench import machine, problems
from soap_optim.bench.muon import MuonWithAdamW, split_groups
from soap_optim.bench.suite import Settings

OLD_DEFAULTS = dict(betas=(0.95, 0.95), precondition_frequency=10)


def arms(lr: float) -> Dict[str, Any]:
    soap = lambda **kw: (lambda model: soap_optim.SOAP(model.parameters(), lr=lr, weight_decay=0.01, **kw))  # noqa: E731
    return {
        "torch AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=lr, foreach=True),
        "torch Muon + AdamW": lambda model: MuonWithAdamW(split_groups(model), lr=lr),
        "SOAP f 10 (old defaults)": soap(**OLD_DEFAULTS),
        "SOAP f 2": soap(betas=(0.9, 0.95), precondition_frequency=2),
        "SOAP f 1": soap(betas=(0.9, 0.95), precondition_frequency=1),
        "SOAP f 2, tolerance 0.05": soap(betas=(0.9, 0.95), precondition_frequency=2, refresh_tolerance=0.05),
        "SOAP f 1, tolerance 0.05": soap(betas=(0.9, 0.95), precondition_frequency=1, refresh_tolerance=0.05),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--out", default="refresh_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings(steps=args.steps, width=args.width, depth=args.depth)
    task = problems.TASKS["lm"](settings, torch.device("cpu"))
    problem = task.build(0)
    runs = {}
    for name, build in arms(args.lr).items():
        model = copy.deepcopy(problem.base)
        runs[name] = {"model": model, "optimizer": build(model), "times": [], "refresh": [], "losses": []}
    names = list(runs)
    load_start = machine.load_average()
    for step in range(args.steps):
        batch = problem.batch_at(step)
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            optimizer, model = run["optimizer"], run["model"]
            for group in optimizer.param_groups:
                group["lr"] = args.lr * task.schedule(step)
            optimizer.zero_grad(set_to_none=True)
            loss = problem.loss_of(model, batch)
            loss.backward()
            due = _refresh_due(optimizer)
            started = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - started
            run["losses"].append(loss.item())
            if step >= args.warmup:
                (run["refresh"] if due else run["times"]).append(elapsed)
    adamw = statistics.median(runs["torch AdamW"]["times"])
    table: Dict[str, Dict[str, Any]] = {}
    for name, run in runs.items():
        amortized = _amortized(run["times"], run["refresh"], args.steps - args.warmup)
        table[name] = {
            "plain_ms": 1e3 * statistics.median(run["times"]) if run["times"] else None,
            "refresh_ms": 1e3 * statistics.median(run["refresh"]) if run["refresh"] else None,
            "amortized_ms": 1e3 * amortized,
            "amortized_vs_adamw": amortized / adamw,
            "final_train_loss": sum(run["losses"][-10:]) / 10,
        }
    result = {"machine": machine.describe(torch.device("cpu")), "load_average": [load_start, machine.load_average()],
              "settings": vars(args), "arms": table}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(f"load average {load_start} -> {result['load_average'][1]}; AdamW median step {1e3 * adamw:.2f} ms")
    print("| arm | plain step ms | refresh step ms | amortized ms | amortized / AdamW | train loss (last 10) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {fmt(row['plain_ms'])} | {fmt(row['refresh_ms'])} | {fmt(row['amortized_ms'])} | "
              f"{row['amortized_vs_adamw']:.2f}x | {row['final_train_loss']:.3f} |")


def _amortized(plain: List[float], refresh: List[float], steps: int) -> float:
    """Per step: the median plain step and the mean refresh step (without outliers above 3x the median:
    another program's spell), weighted by how many of each there were."""
    def robust_mean(times: List[float]) -> float:
        if not times:
            return 0.0
        cap = 3 * statistics.median(times)
        kept = [t for t in times if t <= cap]
        return sum(kept) / len(kept)

    plain_part = statistics.median(plain) * len(plain) if plain else 0.0
    return (plain_part + robust_mean(refresh) * len(refresh)) / steps


def _refresh_due(optimizer) -> bool:
    """Whether this step() of a SOAP optimizer has a refresh due (its parameters share one step count)."""
    if not isinstance(optimizer, soap_optim.SOAP):
        return False
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "bases" in state and any(b is not None for b in state["bases"]):
                return (int(state["step"]) + 1) % group["precondition_frequency"] == 0
    return False


if __name__ == "__main__":
    main()
