"""What it costs to derive the distribution mode from the parameters at every step.

    python benchmarks/mode_check_cost.py [--width 256] [--depth 2] [--steps 20] [--rounds 5]

The optimizer checks, at every ``step``, whether the parameters in ``param_groups`` are still the ones its
layout was derived from (accelerate and HF Trainer swap FSDP2's DTensors in after construction). This
times SOAP's step on the benchmark GPT (one process, one thread) with the check as it is and with it
replaced by nothing after the first step, in alternating rounds of the same run, and prints both and
their ratio, plus the check alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("soap_optim") is None:  # not installed: use this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import soap_optim  # noqa: E402
from soap_optim.bench import tasks  # noqa: E402
from soap_optim.distributed.layer import Distribution  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="steps per round (default: 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each variant, alternating (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tasks.gpt(args.width, args.depth, 64)
    opt = soap_optim.SOAP(model.parameters(), lr=1e-3, precondition_frequency=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # builds the state
    checked = Distribution.sync

    def skipped(self, optimizer, groups):  # the check replaced by nothing
        return None

    times = {"with the check": [], "without": []}
    for _ in range(args.rounds):
        for name, sync in (("with the check", checked), ("without", skipped)):
            Distribution.sync = sync
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    Distribution.sync = checked
    start = time.perf_counter()
    for _ in range(1000):
        opt._distribution.sync(opt, opt.param_groups)
    alone = (time.perf_counter() - start) / 1000
    with_check, without = statistics.median(times["with the check"]), statistics.median(times["without"])
    print(f"SOAP step on the benchmark GPT (width {args.width}, depth {args.depth}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} tensors), "
          f"median of {args.rounds} rounds of {args.steps} steps:")
    print(f"  with the check: {1e3 * with_check:.2f} ms   without: {1e3 * without:.2f} ms   "
          f"ratio {with_check / without:.4f}")
    print(f"  the check alone: {1e6 * alone:.1f} us per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
