"""Tables and band plots of the seeded form of the training tasks (:mod:`.evidence`)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from .optimizers import BASELINE
from .report import _fmt, _table

DIAGNOSIS = "Where SOAP loses this swap: each suspect alone, against the recipe's AdamW"
TABLES = {
    "shared": "Shared lr",
    "best": "Each optimizer at its own best lr (chosen on the validation split)",
    "swap": "One-line swap: AdamW's settings, unchanged",
    "swap/diagnosis": DIAGNOSIS,
    "swap_shared": "One-line swap at the task's shared lr, as a loop has it (untuned)",
    "swap_shared/diagnosis": DIAGNOSIS,
}


def _table_of(section: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    """A table of the section by its path in :data:`TABLES` (``swap/diagnosis``: the swap's diagnosis)."""
    table: Optional[Dict[str, Any]] = section
    for part in name.split("/"):
        table = (table or {}).get(part)
    return table


def _interval(value: Optional[Dict[str, Any]], spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
    if not value or value.get("mean") is None:
        return "–"
    mean = f"{value['mean'] * scale:{spec}}{suffix}"
    if value.get("low") is None:
        return mean
    return f"{mean} [{value['low'] * scale:{spec}}, {value['high'] * scale:{spec}}]"


def _reached(entry: Dict[str, Any]) -> str:
    return f"{entry['reached']}/{len(entry['seeds'])}"


def table_lines(section: Dict[str, Any], name: str, metric_name: str, extra: Optional[str] = None) -> List[str]:
    part = _table_of(section, name)
    fixed = part.get("target")
    target = f"f/f0 <= {fixed:g}" if fixed is not None else f"AdamW's final {metric_name} on the same seed"
    lines = [f"Target: {target}. Intervals: 95% over the seeds (t); \"vs AdamW\" compares final {metric_name} intervals.", ""]
    if name.startswith("swap") and "recipe" in part:
        recipe = part["recipe"]
        lines = [
            f"Recipe: lr {recipe['lr']:g} ({part['lr_source']}), betas {tuple(recipe['betas'])}, eps {recipe['eps']:g}, "
            f"weight_decay {recipe['weight_decay']:g}, {section['schedule']}; other arguments at each class's default.",
            "",
        ] + lines
    header = ["optimizer", "lr", f"final {metric_name}", "vs AdamW"]
    if extra:
        header.append(f"final {extra}")
    header += ["steps to target", "% of AdamW's steps", "seconds to target", "% of AdamW's seconds", "reached", "ms/step"]
    rows = []
    for entry in part["optimizers"].values():
        failures = entry["failures"]
        row = [
            entry["label"] + (f" ({len(failures)} failed: {failures[0]})".replace("|", "/") if failures else ""),
            _fmt(entry["lr"], "g"),
            _interval(entry["final"], ".2e" if fixed is not None else ".4f"),
            "reference" if entry["key"] == BASELINE and entry["vs_reference"] is None else (entry["vs_reference"] or "–"),
        ]
        if extra:
            row.append(_interval(entry.get(extra), ".3f"))
        row += [
            _interval(entry["steps_to_target"], ".0f"),
            _interval(entry["fraction_of_reference_steps"], ".0f", 100, "%"),
            _interval(entry["seconds_to_target"], ".2f"),
            _interval(entry["fraction_of_reference_seconds"], ".0f", 100, "%"),
            _reached(entry),
            _interval(entry["ms_per_step"], ".1f"),
        ]
        rows.append(row)
    return lines + _table(header, rows) + [""]


def grid_lines(record: Dict[str, Any], labels: Dict[str, str]) -> List[str]:
    lrs = sorted({float(lr) for by_lr in record["grid"].values() for lr in by_lr})
    rows = []
    for key, by_lr in record["grid"].items():
        cells = []
        for lr in lrs:
            value = by_lr.get(f"{lr:g}")
            cell = _fmt(value, ".4f")
            cells.append(f"**{cell}**" if lr == record["chosen"][key] else cell)
        rows.append([labels.get(key, key), *cells])
    lines = [f"lr grid ({record['metric']}; chosen in bold)"
             + (f", on instances {record['selection_seeds']}" if "selection_seeds" in record else "") + ":", ""]
    lines += _table(["optimizer", *[f"{lr:g}" for lr in lrs]], rows) + [""]
    if record["at_edge"]:
        lines += [f"At the grid's edge (a wider grid may find better): {', '.join(labels.get(k, k) for k in record['at_edge'])}.", ""]
    return lines


def section_lines(results: Dict[str, Any], task: str, metric_name: str, extra: Optional[str] = None) -> List[str]:
    section = results[task]
    labels = {key: o["label"] for key, o in results["optimizers"].items()}
    seconds = ", ".join(f"{mode} {value:.0f} s" for mode, value in section.get("seconds", {}).items())
    lines = [
        f"{section['task']}. {section['steps']} steps, evaluated every {section['eval_every']}; {section['schedule']}. "
        f"Seeds {', '.join(map(str, section['seeds']))} (initial weights and batch order). Wall time: {seconds}.",
        "",
    ]
    for name, title in TABLES.items():
        if _table_of(section, name) is None:
            continue
        lines += [f"#### {title}", ""]
        if name == "best":
            lines += grid_lines(section["grid"], labels)
        if name == "swap" and "adamw_lr_grid" in section["swap"]:
            lines += grid_lines(section["swap"]["adamw_lr_grid"], labels)
        lines += table_lines(section, name, metric_name, extra)
    return lines


SECTIONS = {
    "lm": ("Language model, seeded", lambda results: section_lines(results, "lm", "held-out loss")),
    "digits": ("Digits, seeded", lambda results: section_lines(results, "digits", "test loss", "accuracy")),
    "finetune": ("Fine-tune, seeded", lambda results: section_lines(results, "finetune", "test loss", "accuracy")),
    "lstsq": ("Least squares, seeded", lambda results: section_lines(results, "lstsq", "f/f0")),
}


def plot(results: Dict[str, Any], out: Path) -> List[str]:
    """Per seeded task and table: mean loss against step and against seconds, the 95% interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in SECTIONS:
        section = results.get(task)
        if not section or "seeds" not in section:
            continue
        for name, title in TABLES.items():
            table = _table_of(section, name)
            if table is None:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for entry in table["optimizers"].values():
                b = entry["band"]
                if not b["step"]:
                    continue
                style = dict(linewidth=1.4, label=f"{entry['label']} (lr {entry['lr']:g})")
                if entry["key"] == BASELINE:
                    style.update(color="black", linestyle="--", zorder=5)
                for ax, x in zip(axes, (b["step"], b["seconds"])):
                    line, = ax.plot(x, b["mean"], **style)
                    if all(v is not None for v in b["low"]):
                        ax.fill_between(x, b["low"], b["high"], color=line.get_color(), alpha=0.2, linewidth=0)
            finite = [v for e in table["optimizers"].values() for v in e["band"]["mean"] if v is not None and math.isfinite(v)]
            for ax, xlabel in zip(axes, ("step", "training seconds (mean over seeds)")):
                ax.set_xlabel(xlabel)
                ax.set_ylabel("loss (mean, 95% band)")
                ax.grid(alpha=0.3)
                if task == "lstsq":
                    ax.set_yscale("log")
                elif finite:
                    low, high = min(finite), max(finite)
                    ax.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
            axes[1].legend(fontsize=7)
            heading = f"{title}; seeds {section['seeds']}. {section['task'].replace('`', '')}"
            fig.suptitle("\n".join(textwrap.wrap(heading, 130)), fontsize=9)
            fig.tight_layout()
            file_name = f"{task}_{name.replace('/', '_')}.png"
            fig.savefig(out / file_name, dpi=110)
            plt.close(fig)
            written.append(file_name)
    return written
