"""Held state memory and step time of SOAP's batched path when bucket membership changes.

A mixture-of-experts layer: ``--experts`` same-shaped expert weights, each with a gradient on a random
half of the steps (the experts the router sent tokens to). The batched path steps the experts with a
gradient as one bucket whose state lives in stacked buffers (``soap_optim.buckets``). Reported:

* the memory ratio: bytes of every storage the optimizer's state keeps alive, over the bytes of the
  state tensors themselves (1.0: nothing held beyond the state; ``torch.save(opt.state_dict())`` writes
  whole storages, so its size follows the same ratio), after every step, worst and last;
* the mean step time over the measured steps (after ``--warmup`` steps), with ``foreach=False`` (one
  expert at a time) beside it as the yardstick. Time ratios are only comparable within one run.

    python benchmarks/bucket_memory.py --experts 64 --dim 64 --steps 60
"""
from __future__ import annotations

import argparse
import time

import torch

from soap_optim import SOAP


def state_tensors(opt):
    for state in opt.state.values():
        for value in state.values():
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    yield tensor


def memory_ratio(opt) -> float:
    """Bytes of the distinct storages under the state, over the state tensors' own bytes."""
    own, held = 0, {}
    for tensor in state_tensors(opt):
        own += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values()) / own


def run(experts: int, dim: int, steps: int, warmup: int, foreach, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(dim, dim, generator=gen)) for _ in range(experts)]
    opt = SOAP(params, lr=1e-3, precondition_frequency=10, foreach=foreach, fused=False)
    ratios, seconds = [], 0.0
    for step in range(steps):
        chosen = torch.rand(experts, generator=gen) < 0.5
        chosen[step % experts] = True  # at least one expert per step
        for param, active in zip(params, chosen.tolist()):
            param.grad = torch.randn(dim, dim, generator=gen) if active else None
        start = time.perf_counter()
        opt.step()
        if step >= warmup:
            seconds += time.perf_counter() - start
        ratios.append(memory_ratio(opt))
    return max(ratios), ratios[-1], seconds / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    for name, foreach in (("batched", None), ("one at a time", False)):
        worst, last, mean = run(args.experts, args.dim, args.steps, args.warmup, foreach)
        print(f"{name:14s} memory ratio worst {worst:.3f} last {last:.3f}   step {mean * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
