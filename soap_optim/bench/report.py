"""Writing the results: ``results.json``, ``results.md`` (the tables) and PNG plots."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from .optimizers import BASELINE

MB = 1024 * 1024


def finite_only(value: Any) -> Any:
    """The same structure with NaN and infinities replaced by None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v) for v in value]
    return value


def _dumps(value: Any, depth: int = 0) -> str:
    """Indented JSON, except that a list of plain values (a curve) stays on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False)


def write_json(results: Dict[str, Any], path: Path) -> None:
    path.write_text(_dumps(finite_only(results)) + "\n", encoding="utf-8")


def _fmt(value: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    """A markdown table; columns whose cells are all numbers (or empty) are right-aligned."""
    def numeric(cell: str) -> bool:
        text = cell.rstrip("xs ").replace("e-", "").replace("e+", "")
        return cell in ("", "–", "not reached") or text.replace(".", "", 1).replace(",", "").isdigit()

    aligns = ["---:" if all(numeric(row[i]) for row in rows if i < len(row)) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _label(results: Dict[str, Any], key: str) -> str:
    return results["optimizers"].get(key, {}).get("label", key)


# ------------------------------------------------------------------------------------- sections
def step_time_lines(results: Dict[str, Any]) -> List[str]:
    section = results["step"]
    lines: List[str] = []
    for name in ("mlp", "gpt"):
        part = section[name]
        lines += [
            f"### {part['model']}",
            "",
            f"{part['parameters']:,} parameters ({part['param_bytes'] / MB:.2f} MB). {part['warmup_steps']} warm-up "
            f"steps, then {part['measured_steps']} measured steps per optimizer, interleaved.",
            "",
        ]
        rows = []
        for key, r in part["results"].items():
            if "error" in r:
                rows.append([_label(results, key), "failed: " + r["error"].replace("|", "/")] + [""] * 6)
                continue
            rows.append(
                [
                    _label(results, key),
                    _fmt(r["median_ms"], ".2f"),
                    _fmt(r["refresh_ms"], ".2f"),
                    _fmt(r["amortized_ms"], ".2f"),
                    _fmt(r.get("amortized_ratio"), ".2f", "x"),
                    _fmt(r["state_bytes"] / MB, ".2f"),
                    _fmt(r.get("state_ratio"), ".2f", "x"),
                    _fmt(r["state_bytes"] / part["param_bytes"], ".2f"),
                ]
            )
        lines += _table(
            [
                "optimizer",
                "step ms (median, non-refresh)",
                "refresh step ms",
                "amortized ms",
                "vs AdamW",
                "state MB",
                "state vs AdamW",
                "state / params",
            ],
            rows,
        )
        lines.append("")
    return lines


def training_lines(results: Dict[str, Any], task: str, metric_name: str, extra: Optional[str] = None) -> List[str]:
    section = results[task]
    baseline_seconds = section.get("baseline_seconds")
    target = section.get("target")
    lines = [
        section["task"] + f". {section['steps']} steps, evaluated every {section['eval_every']}.",
        "",
        f"Target: AdamW's final {metric_name}, {_fmt(target, '.4f')}. "
        f"Equal time: AdamW's training time, {_fmt(baseline_seconds, '.1f', ' s')}.",
        "",
    ]
    header = ["optimizer", "lr", f"final {metric_name}"]
    if extra:
        header.append(f"final {extra}")
    header += ["steps to target", "fraction of AdamW's steps", "seconds to target", f"{metric_name} at AdamW's time", "ms/step"]
    rows = []
    for key, r in section["optimizers"].items():
        if r["error"] or r["diverged_at"]:
            problem = r["error"] or f"diverged at step {r['diverged_at']}"
            rows.append([r["label"], _fmt(r["lr"], "g"), "failed: " + problem.replace("|", "/")] + [""] * (len(header) - 3))
            continue
        row = [r["label"], _fmt(r["lr"], "g"), _fmt(r["final"], ".4f")]
        if extra:
            row.append(_fmt(r.get(extra), ".3f"))
        reached = r["steps_to_target"]
        row += [
            "not reached" if reached is None else str(reached),
            _fmt(r["fraction_of_baseline_steps"], ".2f"),
            _fmt(r["seconds_to_target"], ".1f"),
            _fmt(r.get("at_baseline_seconds"), ".4f"),
            _fmt(r["ms_per_step"], ".1f"),
        ]
        rows.append(row)
    return lines + _table(header, rows) + [""]


def least_squares_lines(results: Dict[str, Any]) -> List[str]:
    section = results["lstsq"]
    lines = [section["task"] + f". {section['steps']} steps, cosine decay to 0, no weight decay.", ""]
    rows = []
    for key, r in section["optimizers"].items():
        if r["error"] or r["diverged_at"]:
            problem = r["error"] or f"diverged at step {r['diverged_at']}"
            rows.append([r["label"], _fmt(r["lr"], "g"), "failed: " + problem.replace("|", "/"), "", "", "", "", ""])
            continue
        rows.append(
            [
                r["label"],
                _fmt(r["lr"], "g"),
                "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"]),
                _fmt(r["seconds_to_target"], ".2f"),
                _fmt(r["best"], ".2e"),
                _fmt(r["final"], ".2e"),
                _fmt(r.get("distance"), ".2e"),
                _fmt(r["ms_per_step"], ".2f"),
            ]
        )
    header = [
        "optimizer", "lr", f"steps to f/f0 <= {section['target']:g}", "seconds to it", "best f/f0", "final f/f0",
        "final distance to W* (relative)", "ms/step",
    ]
    return lines + _table(header, rows) + [""]


SECTIONS = {
    "step": ("Step time and optimizer state", step_time_lines),
    "lm": ("Language model", lambda results: training_lines(results, "lm", "held-out loss")),
    "digits": ("Digits", lambda results: training_lines(results, "digits", "test loss", extra="accuracy")),
    "finetune": ("Fine-tune", lambda results: training_lines(results, "finetune", "test loss", extra="accuracy")),
    "lstsq": ("Least squares with a known optimum", least_squares_lines),
}


def section_of(results: Dict[str, Any], task: str):
    """(title, lines function) of a part: the seeded form's when the part ran seeded."""
    from . import evidence_report

    if "seeds" in results[task]:
        return evidence_report.SECTIONS[task]
    return SECTIONS[task]


def warning_lines(results: Dict[str, Any], task: str) -> List[str]:
    found = results[task].get("warnings") or []
    return [f"Warning raised during this part: {text}" for text in found] + ([""] if found else [])


def optimizer_lines(results: Dict[str, Any]) -> List[str]:
    rows = []
    for key, o in results["optimizers"].items():
        kwargs = ", ".join(f"{k}={v}" for k, v in (o["kwargs"] or {}).items())
        rows.append([f"`{key}`", o["label"], o["source"], f"`{o['class']}`", kwargs, "; ".join(o["notes"])])
    return [
        "The exact keyword arguments, at the first `--lr`; the least-squares task uses `--lstsq-lr` and "
        "weight_decay=0. Everything not listed is at the class's default.",
        "",
    ] + _table(["key", "optimizer", "from", "class", "kwargs", "notes"], rows) + [""]


def _busy_note(machine: Dict[str, Any], results: Dict[str, Any]) -> str:
    loads = [x for x in (machine.get("load_average_at_start"), results.get("load_average_at_end")) if x is not None]
    if loads and max(loads) > machine["cores"]:
        return f": above the {machine['cores']} cores, so other work shared them and the times are noisy"
    return ""


def markdown(results: Dict[str, Any]) -> str:
    machine = results["machine"]
    settings = results["settings"]
    lines = [
        "# soap_optim benchmark",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']} "
        f"({machine.get('threads_reason', 'torch default')}); "
        f"device {machine['device']} ({machine['device_name']})",
        f"- python {machine['python']}, torch {machine['torch']}, triton {machine['triton'] or 'not installed'}, "
        f"soap_optim {machine['soap_optim']}; heavyball {machine['heavyball'] or 'not installed'}, "
        f"pytorch-optimizer {machine['pytorch-optimizer'] or 'not installed'}",
        f"- load average at start {_fmt(machine.get('load_average_at_start'), '.1f')}, at end "
        f"{_fmt(results.get('load_average_at_end'), '.1f')}{_busy_note(machine, results)}",
        f"- command: `{results['command']}`; total {results['wall_seconds']:.0f} s",
        f"- shared hyperparameters: lr {', '.join(f'{lr:g}' for lr in settings['lrs'])} (least squares: "
        f"{', '.join(f'{lr:g}' for lr in settings['lstsq_lrs'])}), betas {tuple(settings['betas'])}, eps {settings['eps']:g}, "
        f"weight_decay {settings['weight_decay']:g}, precondition_frequency {settings['precondition_frequency']}, "
        f"max_precond_dim {settings['max_precond_dim']}; {settings['warmup_fraction']:.0%} linear warm-up then cosine "
        f"decay to 0 (fine-tune: constant lr {', '.join(f'{lr:g}' for lr in settings['finetune_lrs'])}); "
        + (f"seeds {settings['seed']} to {settings['seed'] + settings['seeds'] - 1}" if settings["seeds"] > 1 else f"seed {settings['seed']}")
        + ("; preset " + settings["preset"] if settings.get("preset") else ""),
    ]
    for note in results["notes"]:
        lines.append(f"- note: {note}")
    lines.append("")
    for task in SECTIONS:
        if task in results:
            title, body = section_of(results, task)
            lines += [f"## {title}", ""] + body(results) + warning_lines(results, task)
    lines += ["## Optimizers", ""] + optimizer_lines(results)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plots
def matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib is not installed ({error}): no plots; install the bench extra for them"
    return None


def plot(results: Dict[str, Any], out: Path) -> List[str]:
    """One PNG per training task (metric vs step and vs seconds) and one of step times; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    titles = {"lm": "held-out loss (nats/byte)", "digits": "test loss", "finetune": "test loss", "lstsq": "f(W) / f(W0)"}
    for task, ylabel in titles.items():
        if task not in results or "seeds" in results[task]:  # seeded parts: evidence_report.plot
            continue
        section = results[task]
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
        chosen = {(key, o["lr"]) for key, o in section["optimizers"].items()}
        low, start = math.inf, None
        for run in section["runs"]:
            curve = run["curve"]
            if (run["key"], run["lr"]) not in chosen or not curve.get("step"):
                continue
            steps, seconds, values = curve["step"], curve["seconds"], curve["loss"]
            style = dict(linewidth=1.4, label=_label(results, run["key"]))
            if run["key"] == BASELINE:  # on top and dashed, so an identical curve cannot hide it
                style.update(color="black", linestyle="--", linewidth=1.6, zorder=5)
            by_step.plot(steps, values, **style)
            by_time.plot(seconds, values, **style)
            finite = [v for v in values if v is not None and math.isfinite(v)]
            low = min([low, *finite]) if finite else low
            start = finite[0] if finite else start
        for axes, xlabel in ((by_step, "step"), (by_time, "training seconds (optimizer + forward/backward)")):
            axes.set_xlabel(xlabel)
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            if task == "lstsq":
                axes.set_yscale("log")
            elif start is not None and math.isfinite(low) and start > low:
                # Up to the initial loss: a spike above it would squeeze the part that tells optimizers apart.
                axes.set_ylim(low - 0.03 * (start - low), start + 0.03 * (start - low))
        if section.get("target") is not None:
            for axes in (by_step, by_time):
                axes.axhline(section["target"], color="gray", linestyle=":", linewidth=1)
        by_time.legend(fontsize=8)
        fig.suptitle("\n".join(textwrap.wrap(section["task"].replace("`", ""), 130)), fontsize=9)
        fig.tight_layout()
        name = f"{task}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    if "step" in results:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, name in zip(axes, ("mlp", "gpt")):
            part = results["step"][name]["results"]
            keys = [k for k, r in part.items() if "error" not in r]
            medians = [part[k]["median_ms"] for k in keys]
            amortized = [part[k]["amortized_ms"] for k in keys]
            positions = range(len(keys))
            ax.barh([p + 0.2 for p in positions], medians, height=0.4, label="median non-refresh step")
            ax.barh([p - 0.2 for p in positions], amortized, height=0.4, label="amortized (incl. refresh)")
            ax.set_yticks(list(positions), [_label(results, k) for k in keys], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("optimizer.step() ms")
            ax.set_title(name.upper(), fontsize=9)
            ax.grid(alpha=0.3, axis="x")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "step_time.png", dpi=110)
        plt.close(fig)
        written.append("step_time.png")
    return written
