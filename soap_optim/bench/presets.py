"""``--preset NAME``: named sets of settings; any flag given on the command line overrides the preset's value.

``gpt-25m`` is a GPU-sized language-model run: a byte-level GPT of about 25 million parameters (width
512, 8 blocks, context 256), 3,000 steps of 32 sequences, on 4 MB of standard-library source. On a CPU it
runs in a shortened form only (``--steps``, ``--batch-size``, ``--context``, ``--heldout-windows`` given
small values), which is what the tests exercise.
"""
from __future__ import annotations

from typing import Any, Dict

PRESETS: Dict[str, Dict[str, Any]] = {
    "gpt-25m": dict(
        tasks=("step", "lm"),
        width=512,
        depth=8,
        context=256,
        batch_size=32,
        steps=3000,
        evals=30,
        lrs=(3e-3,),
        train_bytes=4_000_000,
        heldout_windows=256,
    ),
}

# Settings fields whose command-line flag stores under another name.
FLAG_DEST = {"lrs": "lr"}


def parser_defaults(name: str, flag_dests) -> Dict[str, Any]:
    """The preset's values for fields that have a flag, keyed by the flag's argparse dest."""
    return {FLAG_DEST.get(k, k): v for k, v in PRESETS[name].items() if FLAG_DEST.get(k, k) in flag_dests}


def other_fields(name: str, flag_dests) -> Dict[str, Any]:
    """The preset's values for fields without a flag (set directly on the settings)."""
    return {k: v for k, v in PRESETS[name].items() if FLAG_DEST.get(k, k) not in flag_dests}
