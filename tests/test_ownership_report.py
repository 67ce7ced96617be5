"""benchmarks/ownership.py on the benchmark GPT's shapes at 2 ranks, against a computation of its own:
SOAP's cost written out by hand, a plain greedy loop, per-rank loads summed directly."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ownership.py"
_spec = importlib.util.spec_from_file_location("ownership_report", _PATH)
ownership = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ownership)

WORLD = 2
FREQUENCY = 10


def _soap_cost(shape):
    """SOAP defaults (max_precond_dim 10000, no 1-D preconditioning): both axes of a matrix are
    preconditioned: 3 N (m + n) for the EMA and rotations, (4 d^3 + 2 N d) per axis every f steps, 10 N."""
    numel = math.prod(shape)
    dims = list(shape) if len(shape) == 2 else []
    return 3 * numel * sum(dims) + sum(4 * d**3 + 2 * numel * d for d in dims) / FREQUENCY + 10 * numel


def _greedy(costs, world):
    """Largest first (ties by position), each to the least-loaded rank (ties to the lowest)."""
    loads, owners = [0.0] * world, [None] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners, loads


def test_benchmark_gpt_shapes():
    shapes = ownership.benchmark_gpt_shapes(64, 2, 64)
    assert len(shapes) == 30
    assert ("head.weight", (256, 64)) in shapes and ("blocks.1.mlp_out.weight", (64, 256)) in shapes
    assert sum(math.prod(s) for _, s in shapes) == 137_216


def test_costs_match_the_formula():
    shapes = ownership.benchmark_gpt_shapes(64, 2, 64)
    costs, elementwise = ownership.soap_costs(shapes, precondition_frequency=FREQUENCY)
    assert costs == pytest.approx([_soap_cost(s) for _, s in shapes], rel=1e-12)
    assert elementwise == [len(s) == 1 for _, s in shapes]


def test_balance_at_two_ranks():
    shapes = ownership.benchmark_gpt_shapes(64, 2, 64)
    report = ownership.ownership_report(shapes, WORLD, precondition_frequency=FREQUENCY)
    costs = [_soap_cost(s) for _, s in shapes]
    mean = sum(costs) / WORLD

    _, loads = _greedy(costs, WORLD)
    assert report["ddp"] == pytest.approx(max(loads) / mean, rel=1e-12)

    matrices = [i for i, (_, s) in enumerate(shapes) if len(s) == 2]
    owners, _ = _greedy([costs[i] for i in matrices], WORLD)
    fsdp = [0.0] * WORLD
    for i, owner in zip(matrices, owners):
        fsdp[owner] += costs[i]
    for _, shape in (shapes[i] for i in range(len(shapes)) if i not in matrices):
        rows, half = shape[0], -(-shape[0] // WORLD)  # torch.chunk's split: rank 0 gets the larger half
        fsdp[0] += 10 * half
        fsdp[1] += 10 * (rows - half)
    assert report["fsdp2"] == pytest.approx(max(fsdp) / mean, rel=1e-12)

    numel_owners, _ = _greedy([math.prod(s) for _, s in shapes], WORLD)
    by_numel = [sum(c for c, o in zip(costs, numel_owners) if o == r) for r in range(WORLD)]
    assert report["numel"] == pytest.approx(max(by_numel) / mean, rel=1e-12)

    # six 256-wide matrices of equal cost split 3/3; what is left is within 2% of even
    assert 1.0 <= report["ddp"] < 1.02 and report["bound"] == 1.0
    assert report["largest"]["shape"] == [256, 64] and not report["dominated"]


def test_gpt2_shapes():
    shapes = ownership.gpt2_shapes()
    assert sum(math.prod(s) for _, s in shapes) == 124_439_808  # GPT-2 small, LM head tied to wte
