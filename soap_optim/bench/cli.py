"""Command line: ``python -m soap_optim.bench`` (or ``soap-bench``, or ``python benchmarks/run.py``)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import evidence_report, machine, presets, report, suite
from .optimizers import all_specs, select
from .suite import Settings


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _names(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="soap-bench",
        description="Benchmark soap_optim's optimizers against torch's AdamW and other libraries: step time, "
        "optimizer memory, and convergence on real data and on a badly conditioned problem. The defaults "
        "finish in a few minutes on two CPU cores; the flags scale it up.",
    )
    parser.add_argument("--tasks", type=_names, default=list(suite.TASKS),
                        help=f"comma-separated parts to run, from {','.join(suite.TASKS)} (default: all)")
    parser.add_argument("--optimizers", type=_names, default=None,
                        help="comma-separated optimizer keys (default: every available one; see --list). "
                        "torch-adamw is always added: every ratio is to it")
    parser.add_argument("--list", action="store_true", help="list the optimizer keys and whether each can run here, then exit")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"training steps of the language-model and digits tasks (default: {defaults.steps})")
    parser.add_argument("--width", type=int, default=defaults.width,
                        help=f"width of the GPT and the MLP, a multiple of 4 (default: {defaults.width})")
    parser.add_argument("--depth", type=int, default=defaults.depth,
                        help=f"transformer blocks of the GPT, MLP blocks of the MLP (default: {defaults.depth})")
    parser.add_argument("--context", type=int, default=defaults.context, help=f"GPT context in bytes (default: {defaults.context})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"sequences (lm) or images (digits) per step (default: {defaults.batch_size})")
    parser.add_argument("--lr", type=_floats, default=defaults.lrs,
                        help="learning rate shared by every optimizer; a comma-separated list runs each optimizer at "
                        "each and reports its best (default: 1e-2, torch AdamW's best on the default language-model task)")
    parser.add_argument("--lstsq-lr", type=_floats, default=defaults.lstsq_lrs,
                        help="learning rate(s) for the least-squares task (default: 3e-2)")
    parser.add_argument("--lstsq-steps", type=int, default=defaults.lstsq_steps, help=f"steps of the least-squares task (default: {defaults.lstsq_steps})")
    parser.add_argument("--precondition-frequency", type=int, default=defaults.precondition_frequency,
                        help=f"refresh period of every preconditioned optimizer (default: {defaults.precondition_frequency})")
    parser.add_argument("--timing-periods", type=int, default=defaults.timing_periods,
                        help=f"refresh periods measured per optimizer in the step-time part (default: {defaults.timing_periods})")
    parser.add_argument("--timing-warmup", type=int, default=defaults.timing_warmup,
                        help=f"unmeasured steps first, rounded up to whole periods (default: {defaults.timing_warmup})")
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps,
                        help=f"steps of the fine-tune task (default: {defaults.finetune_steps})")
    parser.add_argument("--finetune-lr", type=_floats, default=defaults.finetune_lrs,
                        help="learning rate(s) for the fine-tune task (default: 3e-3, a first classifier's)")
    parser.add_argument("--heldout-windows", type=int, default=defaults.heldout_windows,
                        help=f"held-out windows of the language model's evaluation (default: {defaults.heldout_windows})")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help="run every training task on this many seeds (--seed, --seed + 1, ...; the same for every "
                        "optimizer) and report means with 95%% intervals (default: 1, the single-seed tables)")
    parser.add_argument("--tune", action="store_true",
                        help="also run each optimizer over an lr grid, choose its lr on a validation split, and report "
                        "it at that lr beside the shared-lr results")
    parser.add_argument("--tune-grid", type=_floats, default=defaults.tune_grid,
                        help="the grid of --tune, as multiples of each task's shared lr (default: 0.3,1,3,6)")
    parser.add_argument("--swap", action="store_true",
                        help="also run the one-line-swap table: every optimizer with an AdamW user's settings, unchanged")
    parser.add_argument("--swap-optimizers", type=_names, default=None,
                        help="optimizer keys of the swap table (default: those of --optimizers)")
    parser.add_argument("--swap-lr-multiplier", type=float, default=defaults.swap_lr_multiplier,
                        help=f"the lr multiplier measured for SOAP in the swap table (default: {defaults.swap_lr_multiplier:g})")
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                        help="a named set of settings, flags override it: gpt-25m is a 25M-parameter GPT for 3,000 "
                        "steps, for GPU machines (see benchmarks/README.md)")
    parser.add_argument("--evals", type=int, default=defaults.evals,
                        help=f"held-out evaluations per training run (default: {defaults.evals})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the initial weights, the batch order and the synthetic problems (default: {defaults.seed})")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, fewer when other work already keeps "
                        "cores busy: busy cores make torch's threads wait on each other)")
    parser.add_argument("--heavyball-compile", action="store_true",
                        help="let heavyball use torch.compile (its default); off by default, see the notes")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_settings(argv: Optional[Sequence[str]]) -> tuple:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    dests = {action.dest for action in parser._actions}
    if preset:
        parser.set_defaults(**presets.parser_defaults(preset, dests))
    args = parser.parse_args(argv)
    unknown = [task for task in args.tasks if task not in suite.TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(suite.TASKS)}")
    for name in ("steps", "width", "depth", "context", "batch_size", "lstsq_steps", "precondition_frequency",
                 "timing_periods", "evals", "finetune_steps", "heldout_windows", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.width % 4:
        parser.error(f"--width must be a multiple of 4 (4 attention heads), got {args.width}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.timing_warmup < 0:
        parser.error(f"--timing-warmup must be >= 0, got {args.timing_warmup}")
    settings = Settings(
        tasks=tuple(args.tasks),
        steps=args.steps,
        width=args.width,
        depth=args.depth,
        context=args.context,
        batch_size=args.batch_size,
        lrs=args.lr,
        lstsq_lrs=args.lstsq_lr,
        lstsq_steps=args.lstsq_steps,
        precondition_frequency=args.precondition_frequency,
        timing_periods=args.timing_periods,
        timing_warmup=args.timing_warmup,
        evals=args.evals,
        heldout_windows=args.heldout_windows,
        finetune_steps=args.finetune_steps,
        finetune_lrs=args.finetune_lr,
        seed=args.seed,
        seeds=args.seeds,
        tune=args.tune,
        tune_grid=args.tune_grid,
        swap=args.swap,
        swap_lr_multiplier=args.swap_lr_multiplier,
        preset=preset,
        heavyball_compile=args.heavyball_compile,
        progress=not args.no_progress,
        **(presets.other_fields(preset, dests) if preset else {}),
    )
    return args, settings, parser


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the results (also written to ``--out``)."""
    started = time.perf_counter()
    args, settings, parser = parse_settings(argv)
    specs = all_specs(heavyball_compile=settings.heavyball_compile)
    if args.list:
        for spec in specs:
            status = "available" if spec.unavailable is None else f"unavailable: {spec.unavailable}"
            print(f"{spec.key:<28} {spec.label:<34} {status}")
        return {}
    try:
        device = machine.resolve_device(args.device)
        chosen, notes = select(specs, args.optimizers)
        swap_specs = chosen if args.swap_optimizers is None else select(specs, args.swap_optimizers)[0]
    except ValueError as error:
        parser.error(str(error))
    threads, threads_reason = (args.threads, "--threads") if args.threads else machine.auto_threads(device)
    torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)  # fail now, not after minutes of work
    for spec in {spec.key: spec for spec in chosen + swap_specs}.values():
        if spec.prepare is not None:
            spec.prepare()

    info = machine.describe(device)
    info["threads_reason"] = threads_reason
    for line in machine.summary_lines(info):
        print(line)
    print("optimizers: " + ", ".join(spec.label for spec in chosen))
    for note in notes:
        print(f"note: {note}")
    hyper = settings.hyper(settings.lrs[0])
    print(
        f"shared hyperparameters: lr {','.join(f'{lr:g}' for lr in settings.lrs)}, betas {settings.betas}, "
        f"eps {settings.eps:g}, weight_decay {settings.weight_decay:g}, precondition_frequency "
        f"{settings.precondition_frequency}, max_precond_dim {settings.max_precond_dim}",
        flush=True,
    )

    results: Dict[str, Any] = {
        "schema": 1,
        "command": " ".join(["python -m soap_optim.bench", *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))]),
        "machine": info,
        "settings": settings.as_dict(),
        "optimizers": {spec.key: spec.record(hyper) for spec in chosen + swap_specs},
        "notes": notes,
    }
    for task in settings.tasks:
        reason = suite.skip_reason(task)
        if reason:
            print(f"note: {task} skipped: {reason}")
            notes.append(f"{task} skipped: {reason}")
            continue
        part_started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if settings.seeded and task in suite.SEEDED_PARTS:
                results[task] = suite.SEEDED_PARTS[task](settings, chosen, device, swap_specs)
            else:
                results[task] = suite.PARTS[task](settings, chosen, device)
        results[task]["part_seconds"] = time.perf_counter() - part_started
        results[task]["warnings"] = _distinct_warnings(caught)
        print("\n".join(_part_lines(results, task)), flush=True)

    plot_note = report.matplotlib_missing()
    results["load_average_at_end"] = machine.load_average()
    results["wall_seconds"] = time.perf_counter() - started
    out = args.out
    written = ["results.json", "results.md"]
    if plot_note:
        notes.append(plot_note)
        print(f"note: {plot_note}")
    else:
        written += report.plot(results, out) + evidence_report.plot(results, out)
    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(report.markdown(results), encoding="utf-8")
    print(f"\nwrote {', '.join(written)} to {out}/ in {results['wall_seconds']:.0f} s")
    return results


def _distinct_warnings(caught) -> List[str]:
    """Warnings raised during a part (peers warn about lr schedules, say), each once, to keep the tables readable."""
    seen: Dict[str, None] = {}
    for warning in caught:
        seen.setdefault(f"{warning.category.__name__} from {Path(warning.filename).parent.name}/"
                        f"{Path(warning.filename).name}: {warning.message}", None)
    return list(seen)


def _part_lines(results: Dict[str, Any], task: str) -> List[str]:
    title, body = report.section_of(results, task)
    return ["", f"== {title} ({results[task]['part_seconds']:.0f} s)", *body(results), *report.warning_lines(results, task)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
