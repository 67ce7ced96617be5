"""Kernel launches per optimizer step on a 12-layer GPT-2-shaped parameter set.

Counts the operations of one non-refresh ``step()`` that would each be a GPU kernel launch: aten
ops seen at dispatch (views and allocations excluded) plus Triton kernel launches (the torch ops the
CPU interpreter runs inside a launch are not counted). Runs on the CPU; under TRITON_INTERPRET=1 the fused path is counted too. Launch counts
do not depend on the width, so the default width is small.

    TRITON_INTERPRET=1 python benchmarks/count_launches.py [--layers 12] [--width 64]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import soap_optim

# ops that launch no compute kernel on a GPU (allocation, host reads); views are recognized by schema
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "_local_scalar_dense", "detach", "alias", "lift_fresh",
              "set_", "is_nonzero", "_unsafe_view"}


def _host_scalars_only(args) -> bool:
    """True for bookkeeping on 0-d tensors (step counters), which stay on the host even with CUDA params."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dim() == 0 for t in tensors)


class _LaunchCounter(TorchDispatchMode):
    """Counts aten ops that would each launch a kernel, and Triton launches (inside which nothing else counts)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.inside_triton or func.is_view or name in _NO_LAUNCH or name.startswith("_record_function")
                or _host_scalars_only(args)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def gpt_shapes(layers: int, width: int, vocab: int = 512, context: int = 128):
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def count_step(make_optimizer, shapes) -> Counter:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    opt = make_optimizer(params)
    for _ in range(3):  # first step builds preconditioners; measure a plain later step
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    counter = _LaunchCounter()
    restore = _count_triton_launches(counter)
    try:
        with counter:
            opt.step()
    finally:
        restore()
    return counter.counts


def _count_triton_launches(counter: _LaunchCounter):
    """Patch Triton's launch entry point to count launches; returns the function that undoes it."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        return lambda: None
    if os.environ.get("TRITON_INTERPRET") == "1":
        target, attribute = interpreter.GridExecutor, "__call__"
    else:
        target, attribute = jit.JITFunction, "run"
    original = getattr(target, attribute)

    def counted(self_, *args, **kwargs):
        counter.counts["triton launch"] += 1
        counter.inside_triton += 1
        try:
            return original(self_, *args, **kwargs)
        finally:
            counter.inside_triton -= 1

    setattr(target, attribute, counted)
    return lambda: setattr(target, attribute, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    shapes = gpt_shapes(args.layers, args.width)
    print(f"{args.layers}-layer GPT, width {args.width}: {len(shapes)} parameters")
    variants = {
        "torch.optim.AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "SOAP(foreach=False) one parameter at a time": lambda ps: soap_optim.SOAP(ps, foreach=False),
        "SOAP(fused=False) batched PyTorch path": lambda ps: soap_optim.SOAP(ps, fused=False),
    }
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        variants["SOAP(fused=True) Triton kernels"] = lambda ps: soap_optim.SOAP(ps, fused=True)
    for name, make in variants.items():
        counts = count_step(make, shapes)
        total = sum(counts.values())
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(6))
        print(f"{name:48s} {total:5d} launches  ({top})")


if __name__ == "__main__":
    main()
