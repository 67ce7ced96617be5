"""Kernel launches per optimizer step on a 12-layer GPT-2-shaped parameter set.

Counts the operations of one non-refresh ``step()`` that would each be a GPU kernel launch: aten
compute ops seen by the profiler (views, reshapes and other metadata-only ops excluded) plus Triton
kernel launches. Runs on the CPU; under TRITON_INTERPRET=1 the fused path is counted too. Launch counts
do not depend on the width, so the default width is small.

    TRITON_INTERPRET=1 python benchmarks/count_launches.py [--layers 12] [--width 64]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import soap_optim

# metadata-only or allocation ops: no compute kernel on a GPU
_NO_LAUNCH = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::select", "aten::unbind",
    "aten::slice", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::detach", "aten::alias",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::unsqueeze", "aten::squeeze", "aten::numpy_T",
    "aten::mT", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type", "aten::to",
    "aten::_to_copy", "aten::movedim", "aten::matmul", "aten::flatten", "aten::contiguous", "aten::split",
    "aten::chunk", "aten::narrow", "aten::diagonal", "aten::zeros", "aten::zero_", "aten::fill_",
    "aten::scalar_tensor", "aten::lift", "aten::split_with_sizes", "aten::stack",
}


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
    counts: Counter = Counter()
    triton_launches = _count_triton_launches(counts)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    triton_launches.restore()
    for event in prof.events():
        # top-level aten ops only: an op called by another op is part of its parent's kernel
        if event.name.startswith("aten::") and event.cpu_parent is not None \
                and not event.cpu_parent.name.startswith("aten::") and event.name not in _NO_LAUNCH:
            counts[event.name] += 1
    return counts


class _count_triton_launches:
    """Counts Triton grid launches while active (interpreter or GPU)."""

    def __init__(self, counts: Counter):
        self.restore_fn = lambda: None
        try:
            from triton.runtime import interpreter, jit
        except ImportError:
            return
        target = interpreter.GridExecutor if os.environ.get("TRITON_INTERPRET") == "1" else jit.JITFunction
        attribute = "__call__" if target is interpreter.GridExecutor else "run"
        original = getattr(target, attribute)

        def counted(self_, *args, **kwargs):
            counts["triton launch"] += 1
            return original(self_, *args, **kwargs)

        setattr(target, attribute, counted)
        self.restore_fn = lambda: setattr(target, attribute, original)

    def restore(self):
        self.restore_fn()


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
        top = ", ".join(f"{op.replace('aten::', '')} {n}" for op, n in counts.most_common(6))
        print(f"{name:48s} {total:5d} launches  ({top})")


if __name__ == "__main__":
    main()
