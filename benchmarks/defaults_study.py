"""The study behind SOAP's and Shampoo's defaults: candidate settings on the benchmark's training tasks.

Every candidate (a set of keyword arguments) runs on every task at each point of an lr grid, on every
seed, interleaved with the others and with torch's AdamW (the target: its final loss at its own best lr).
Each candidate's lr is chosen on the task's validation split (least squares: on other instances), as
``soap-bench --tune`` does, and reported at that lr on the reported split: final loss with a 95% interval
over the seeds, steps to AdamW's final loss as a fraction of AdamW's, and training ms/step (measured in the
same interleaved runs, so the ratios between candidates hold even on a busy machine).

    python benchmarks/defaults_study.py --family soap --seeds 3 --out study_soap
    python benchmarks/defaults_study.py --family shampoo --seeds 3 --out study_shampoo
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

import soap_optim
from soap_optim.bench import machine, problems
from soap_optim.bench.optimizers import BASELINE, Hyper, OptimizerSpec
from soap_optim.bench.report import write_json
from soap_optim.bench.seeded import aggregate
from soap_optim.bench.suite import Settings
from soap_optim.bench.tune import tune

REFERENCE_SOAP = dict(betas=(0.95, 0.95), shampoo_beta=-1, precondition_frequency=10)


class RefreshSchedule:
    """``precondition_frequency`` as a step function of the step count: ``[(until_step, frequency), ...]``,
    then ``last``. Set on the param groups before each step (SOAP reads the frequency every step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, phases: List[Tuple[int, int]], last: int) -> None:
        self.optimizer, self.phases, self.last, self.calls = optimizer, phases, last, 0
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        frequency = next((f for until, f in self.phases if self.calls < until), self.last)
        for group in self.optimizer.param_groups:
            group["precondition_frequency"] = frequency
        self.calls += 1
        return self.optimizer.step(closure)


def scheduled(cls, phases, last):
    def make(params, **kwargs):
        return RefreshSchedule(cls(params, **kwargs), phases, last)

    make.__qualname__ = make.__name__ = f"{cls.__name__}+schedule"
    make.__module__ = __name__
    return make


def candidates(family: str, steps: int) -> Dict[str, Tuple[str, Any, Dict[str, Any]]]:
    """key -> (label, class, keyword arguments other than lr, eps and weight_decay)."""
    if family == "soap":
        cls = soap_optim.SOAP
        early = max(1, steps // 4)
        return {
            "ref": ("betas (.95,.95), f 10 (reference)", cls, dict(REFERENCE_SOAP)),
            "b90-f10": ("betas (.9,.95), f 10", cls, dict(betas=(0.9, 0.95), precondition_frequency=10)),
            "b95-f2": ("betas (.95,.95), f 2", cls, dict(betas=(0.95, 0.95), precondition_frequency=2)),
            "b90-f2": ("betas (.9,.95), f 2", cls, dict(betas=(0.9, 0.95), precondition_frequency=2)),
            "b90-f1": ("betas (.9,.95), f 1", cls, dict(betas=(0.9, 0.95), precondition_frequency=1)),
            "b90-f2-s99": ("betas (.9,.95), shampoo_beta .99, f 2", cls,
                           dict(betas=(0.9, 0.95), shampoo_beta=0.99, precondition_frequency=2)),
            "b90-f2-s90": ("betas (.9,.95), shampoo_beta .9, f 2", cls,
                           dict(betas=(0.9, 0.95), shampoo_beta=0.9, precondition_frequency=2)),
            "b90b99-f2": ("betas (.9,.99), f 2", cls, dict(betas=(0.9, 0.99), precondition_frequency=2)),
            "b90-f2to10": (f"betas (.9,.95), f 2 for {early} steps, then 10", scheduled(cls, [(early, 2)], 10),
                           dict(betas=(0.9, 0.95), precondition_frequency=2)),
        }
    if family == "soap-variants":  # each flag alone on SOAP's class defaults
        cls = soap_optim.SOAP
        return {
            "defaults": ("SOAP defaults", cls, {}),
            "tolerance": ("+ refresh_tolerance 0.05", cls, dict(refresh_tolerance=0.05)),
            "kl": ("+ factor_update kl (KL-SOAP)", cls, dict(factor_update="kl")),
        }
    if family == "shampoo-variants":  # each flag alone on Shampoo's class defaults
        cls = soap_optim.Shampoo
        return {
            "defaults": ("Shampoo defaults", cls, {}),
            "kl": ("+ factor_update kl (KL-Shampoo, adam grafting)", cls, dict(factor_update="kl")),
            "kl-nograft": ("+ factor_update kl, grafting none, preconditioned from step 1 (the paper's)", cls,
                           dict(factor_update="kl", grafting="none", start_preconditioning_step=1)),
            "gram-nograft": ("grafting none, preconditioned from step 1, exponent 1/2 (kl-nograft's control)", cls,
                             dict(grafting="none", start_preconditioning_step=1, exponent_override=0.5)),
        }
    if family == "shampoo":
        cls = soap_optim.Shampoo
        return {
            "ref": ("betas (.9,.999), shampoo_beta 1, f 10 (current)", cls,
                    dict(betas=(0.9, 0.999), shampoo_beta=1.0, precondition_frequency=10)),
            "f2": ("betas (.9,.999), shampoo_beta 1, f 2", cls,
                   dict(betas=(0.9, 0.999), shampoo_beta=1.0, precondition_frequency=2)),
            "b95-f2": ("betas (.9,.95), shampoo_beta 1, f 2", cls,
                       dict(betas=(0.9, 0.95), shampoo_beta=1.0, precondition_frequency=2)),
            "b95-s95-f2": ("betas (.9,.95), shampoo_beta .95, f 2", cls,
                           dict(betas=(0.9, 0.95), shampoo_beta=0.95, precondition_frequency=2)),
            "b95-s95-f10": ("betas (.9,.95), shampoo_beta .95, f 10", cls,
                            dict(betas=(0.9, 0.95), shampoo_beta=0.95, precondition_frequency=10)),
        }
    raise ValueError(f"unknown family {family!r}")


def specs_for(family: str, steps: int, only: List[str] = ()) -> List[OptimizerSpec]:
    adamw = OptimizerSpec(BASELINE, "torch AdamW (0.9, 0.999)", "torch", torch.optim.AdamW,
                          lambda h: dict(lr=h.lr, betas=(0.9, 0.999), eps=h.eps, weight_decay=h.weight_decay, foreach=True))
    out = [adamw]
    for key, (label, cls, kwargs) in candidates(family, steps).items():
        if only and key not in only:
            continue
        out.append(OptimizerSpec(f"{family}:{key}", label, "soap_optim", cls,
                                 lambda h, kw=kwargs: dict(kw, lr=h.lr, eps=h.eps, weight_decay=h.weight_decay)))
    return out


def study_task(name: str, settings: Settings, family: str, seeds: List[int], grid: List[float],
               only: List[str] = ()) -> Dict[str, Any]:
    device = torch.device("cpu")
    task = problems.TASKS[name](settings, device, validation=name != "lstsq")
    specs = specs_for(family, task.steps, only)
    # the fine-tune's shared lr (3e-3, a first classifier's) is far below every optimizer's best: shift its grid up
    lrs = sorted({float(f"{task.lrs[0] * m * (2.5 if name == 'finetune' else 1):.6g}") for m in grid})
    started = time.perf_counter()
    chosen, record, runs = tune(task, specs, lambda lr: settings.hyper(lr, **task.changes), lrs, seeds, device, False)
    at_best = [run for run in runs if run.lr == chosen[run.key]]
    table = aggregate(at_best, (BASELINE, chosen[BASELINE]), target=task.target, extra=task.extra)
    for entry in table["optimizers"].values():
        entry.pop("band", None)
    return {"task": task.description, "steps": task.steps, "lr_grid": lrs, "grid": record, "chosen": chosen,
            "table": table, "labels": {spec.key: spec.label for spec in specs},
            "seconds": time.perf_counter() - started}


def markdown(results: Dict[str, Any]) -> str:
    lines = []
    for name, section in results["tasks"].items():
        lines += [f"### {name}: {section['task']}", "",
                  "| setting | lr (chosen) | final loss [95%] | steps to target [95%] | % of AdamW's steps [95%] | reached | ms/step |",
                  "|---|---:|---|---|---|---:|---:|"]
        for key, entry in section["table"]["optimizers"].items():
            final, frac, ms = entry["final"], entry["fraction_of_reference_steps"], entry["ms_per_step"]
            fmt = lambda i, s="{:.4g}": "–" if i.get("mean") is None else (  # noqa: E731
                s.format(i["mean"]) + (f" [{s.format(i['low'])}, {s.format(i['high'])}]" if i.get("low") is not None else ""))
            pct = "–" if frac.get("mean") is None else fmt({k: (v * 100 if v is not None else None) for k, v in frac.items()}, "{:.0f}")
            steps = fmt(entry["steps_to_target"], "{:.0f}")
            edge = " (grid edge)" if entry["key"] in section["grid"].get("at_edge", []) else ""
            lines.append(f"| {section['labels'][entry['key']]} | {entry['lr']:g}{edge} | {fmt(final)} | {steps} | {pct} | "
                         f"{entry['reached']}/{len(entry['seeds'])} | {ms.get('mean') or 0:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("soap", "soap-variants", "shampoo", "shampoo-variants"), default="soap")
    parser.add_argument("--tasks", default="lm,digits,finetune,lstsq")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="1,2.5,6", help="lr multiples of each task's shared lr")
    parser.add_argument("--out", type=Path, default=Path("study_out"))
    parser.add_argument("--steps", type=int, default=Settings().steps, help="steps of the lm and digits tasks")
    parser.add_argument("--only", default="", help="comma-separated candidate keys (default: all)")
    parser.add_argument("--render", type=Path, default=None, help="only rewrite the tables of an earlier study.json")
    args = parser.parse_args()
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text(encoding="utf-8"))))
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(steps=args.steps)
    only = [key for key in args.only.split(",") if key]
    results: Dict[str, Any] = {"machine": machine.describe(torch.device("cpu")), "family": args.family,
                               "seeds": list(range(args.seeds)), "steps": args.steps, "only": only, "tasks": {}}
    for name in args.tasks.split(","):
        results["tasks"][name] = study_task(name, settings, args.family, list(range(args.seeds)),
                                            [float(m) for m in args.grid.split(",")], only)
        print(f"{name}: {results['tasks'][name]['seconds']:.0f} s", flush=True)
        write_json(results, args.out / "study.json")
        (args.out / "study.md").write_text(markdown(results), encoding="utf-8")
    results["load_average_at_end"] = machine.load_average()
    write_json(results, args.out / "study.json")
    print(markdown(results))


if __name__ == "__main__":
    main()
