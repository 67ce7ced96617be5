"""How evenly soap_optim's ownership spreads SOAP's optimizer work over ranks, from shapes alone.

    python benchmarks/ownership.py [--ranks 2,8,64] [--width 64 --depth 2 --context 64] [--out FILE.json]

No training and no process group: the parameters are meta tensors (no memory), the costs are SOAP's own
cost model (``opt._cost``, multiply-adds per step with refreshes amortized) and the assignment is the
distribution layer's (``soap_optim.distributed.assign_owners``). Two parameter sets: the benchmark's
byte-level GPT (``soap_optim.bench.tasks.gpt``) and a 12-layer GPT-2 (124M parameters; wte 50257 x 768,
whose 50257 axis is above ``max_precond_dim=10000`` and so left unpreconditioned).

For each world size it prints max/mean cost per rank (1.00 is a perfect split) for

* ``ddp``: sharded DDP (``process_group=``), every parameter owned by one rank;
* ``fsdp2``: FSDP2, elementwise parameters (biases, norm gains: ``opt._is_elementwise``) stepped on their
  local rows by every rank, the rest owned; the column counts each rank's owned cost plus its rows' share
  of the elementwise cost;
* ``numel``: every parameter assigned greedily by element count, as ``ZeroRedundancyOptimizer`` does,
  measured in SOAP cost;
* ``lower bound``: the best any assignment of whole parameters can do, max(largest cost, total / W) / mean,
  and which parameter sets it when one dominates.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if importlib.util.find_spec("soap_optim") is None:  # not installed: use this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import soap_optim  # noqa: E402
from soap_optim.bench import tasks  # noqa: E402
from soap_optim.distributed import assign_owners, balance, chunk_rows  # noqa: E402
from soap_optim.distributed.placements import make_layout  # noqa: E402
from soap_optim.distributed.plan import build_roles, owner_balance  # noqa: E402

Shapes = List[Tuple[str, Tuple[int, ...]]]


def benchmark_gpt_shapes(width: int = 64, depth: int = 2, context: int = 64) -> Shapes:
    """(name, shape) of every parameter of the benchmark GPT, built on the meta device."""
    with torch.device("meta"):
        model = tasks.gpt(width, depth, context)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> Shapes:
    """GPT-2 small's parameters as Hugging Face lays them out (Conv1D weights are in x out; the LM head
    is tied to wte, so it adds no parameter)."""
    shapes: Shapes = [("wte", (vocab, width)), ("wpe", (context, width))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (width,)), (h + "ln_1.bias", (width,)),
            (h + "attn.c_attn.weight", (width, 3 * width)), (h + "attn.c_attn.bias", (3 * width,)),
            (h + "attn.c_proj.weight", (width, width)), (h + "attn.c_proj.bias", (width,)),
            (h + "ln_2.weight", (width,)), (h + "ln_2.bias", (width,)),
            (h + "mlp.c_fc.weight", (width, 4 * width)), (h + "mlp.c_fc.bias", (4 * width,)),
            (h + "mlp.c_proj.weight", (4 * width, width)), (h + "mlp.c_proj.bias", (width,)),
        ]
    shapes += [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]
    return shapes


def soap_costs(shapes: Shapes, **soap_kwargs) -> Tuple[List[float], List[bool]]:
    """SOAP's cost of each parameter and whether it is elementwise (FSDP2 steps it locally), read from a
    SOAP built over meta tensors of these shapes with ``soap_kwargs`` (precondition_frequency=10 unless
    given, as the benchmark uses)."""
    soap_kwargs.setdefault("precondition_frequency", 10)
    params = [torch.empty(shape, device="meta") for _, shape in shapes]
    opt = soap_optim.SOAP(params, **soap_kwargs)
    hyper = opt._check_group(opt.param_groups[0])
    costs = [float(opt._cost(p.shape, hyper)) for p in params]
    elementwise = [bool(opt._is_elementwise(p.shape, hyper)) for p in params]
    return costs, elementwise


def _row_fractions(shape: Tuple[int, ...], world_size: int) -> List[float]:
    """Each rank's fraction of a parameter's dim-0 rows (FSDP2's torch.chunk split; empty chunks are 0)."""
    rows = shape[0] if shape else 1
    return [(end - start) / rows for start, end in (chunk_rows(rows, world_size, r) for r in range(world_size))]


def ownership_report(shapes: Shapes, world_size: int, **soap_kwargs) -> Dict[str, object]:
    """max/mean cost per rank under each assignment (see the module docstring), for ``world_size`` ranks."""
    costs, elementwise = soap_costs(shapes, **soap_kwargs)
    numels = [math.prod(shape) for _, shape in shapes]
    total = sum(costs)
    mean = total / world_size

    ddp = balance(costs, assign_owners(costs, world_size), world_size)

    owned = [i for i, local in enumerate(elementwise) if not local]
    owned_costs = [costs[i] for i in owned]
    fsdp_owners = assign_owners(owned_costs, world_size)
    fsdp_owned = balance(owned_costs, fsdp_owners, world_size)
    loads = [0.0] * world_size
    for cost, owner in zip(owned_costs, fsdp_owners):
        loads[owner] += cost
    for i, local in enumerate(elementwise):
        if local:  # an elementwise cost is proportional to the entries: each rank pays for its rows
            for rank, fraction in enumerate(_row_fractions(shapes[i][1], world_size)):
                loads[rank] += costs[i] * fraction
    fsdp_max_over_mean = max(loads) / mean if mean else 1.0

    numel_owners = assign_owners(numels, world_size)  # ZeroRedundancyOptimizer's greedy by numel
    numel = balance(costs, numel_owners, world_size)

    largest = max(range(len(costs)), key=lambda i: costs[i])
    bound = max(costs[largest], mean) / mean if mean else 1.0
    return {
        "world_size": world_size,
        "parameters": len(shapes),
        "elements": sum(numels),
        "total_cost": total,
        "ddp": ddp["max_over_mean"],
        "fsdp2": fsdp_max_over_mean,
        "fsdp2_owned_only": fsdp_owned["max_over_mean"],
        "fsdp2_owned_parameters": len(owned),
        "numel": numel["max_over_mean"],
        "bound": bound,
        "largest": {"name": shapes[largest][0], "shape": list(shapes[largest][1]), "cost_share": costs[largest] / total},
        "dominated": costs[largest] > mean,
    }


# Mesh shapes the owner balance is reported for, with the names of their dimensions: HSDP (replicate,
# shard) and torchtitan's (dp_replicate, dp_shard, tp).
MESHES = {"(8, 8) HSDP": (8, 8), "(4, 16) HSDP": (4, 16), "(2, 4, 8) HSDP x TP": (2, 4, 8)}


def gpt2_placements(name: str, mesh_shape: Tuple[int, ...]):
    """How torchtitan-style training places a GPT-2 parameter: FSDP's Shard(0) on the shard dimension,
    replicated over the replicate dimension; on a 3-D mesh, attention/MLP input projections colwise (HF
    Conv1D weights are in x out, so Shard(1)) and output projections rowwise (Shard(0) under FSDP's
    _StridedShard(0)) on tp, everything else replicated on tp."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if len(mesh_shape) == 2:
        return (Replicate(), Shard(0))
    tp = mesh_shape[2]
    if name.endswith(("c_attn.weight", "c_fc.weight")):
        return (Replicate(), Shard(0), Shard(1))
    if name.endswith(("c_attn.bias", "c_fc.bias")):
        return (Replicate(), _StridedShard(0, split_factor=tp), Shard(0))
    if name.endswith("c_proj.weight"):
        return (Replicate(), _StridedShard(0, split_factor=tp), Shard(0))
    return (Replicate(), Shard(0), Replicate())


def mesh_balance(shapes: Shapes, mesh_shape: Tuple[int, ...], spread: bool, **soap_kwargs) -> Dict[str, object]:
    """max/mean of the owned preconditioner work per rank on ``mesh_shape`` (the distribution layer's own
    plan, from placements), by default (each replica group steps its owners) or spread over replicas."""
    costs, elementwise = soap_costs(shapes, **soap_kwargs)
    ranks = torch.arange(math.prod(mesh_shape)).view(mesh_shape)
    layouts = [make_layout(shape, ranks, gpt2_placements(name, mesh_shape)) for name, shape in shapes]
    roles = build_roles(layouts, elementwise, costs, 0, spread=spread)
    owned = owner_balance(roles, costs)
    loads = [0.0] * ranks.numel()
    for role, cost in zip(roles, costs):
        if role.is_local:  # every position pays for its piece
            for position, region in enumerate(role.layout.regions):
                loads[position] += cost * region.numel / max(1, math.prod(region.shape))
        else:
            for owner in role.owners():
                loads[owner] += cost
    mean = sum(loads) / len(loads)
    return {"mesh": list(mesh_shape), "spread": spread, "owned_max_over_mean": owned["max_over_mean"],
            "max_over_mean": max(loads) / mean if mean else 1.0}


def parameter_sets(width: int, depth: int, context: int) -> Dict[str, Shapes]:
    return {
        f"benchmark GPT (width {width}, depth {depth}, context {context})": benchmark_gpt_shapes(width, depth, context),
        "GPT-2 small (12 layers, 768 wide)": gpt2_shapes(),
    }


def table(reports: Dict[str, List[Dict[str, object]]]) -> str:
    lines = [
        "| parameter set | ranks | ddp (cost) | fsdp2 (cost) | numel (ZeRO) | lower bound | largest parameter |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in reports.items():
        for r in rows:
            largest = r["largest"]
            note = f"{largest['name']} {tuple(largest['shape'])}: {100 * largest['cost_share']:.1f}% of the cost"
            if r["dominated"]:
                note += " (dominates: sets the lower bound)"
            lines.append(
                f"| {name} | {r['world_size']} | {r['ddp']:.3f} | {r['fsdp2']:.3f} | {r['numel']:.3f} | "
                f"{r['bound']:.3f} | {note} |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,8,64", help="comma-separated world sizes (default: 2,8,64)")
    parser.add_argument("--width", type=int, default=64, help="benchmark GPT width (default: 64, the benchmark's)")
    parser.add_argument("--depth", type=int, default=2, help="benchmark GPT depth (default: 2)")
    parser.add_argument("--context", type=int, default=64, help="benchmark GPT context (default: 64)")
    parser.add_argument("--precondition-frequency", type=int, default=10)
    parser.add_argument("--max-precond-dim", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    kwargs = dict(precondition_frequency=args.precondition_frequency, max_precond_dim=args.max_precond_dim)
    reports = {
        name: [ownership_report(shapes, w, **kwargs) for w in ranks]
        for name, shapes in parameter_sets(args.width, args.depth, args.context).items()
    }
    print(f"SOAP ownership balance, max/mean cost per rank (1.000 = even); SOAP kwargs {kwargs}")
    print(table(reports))
    meshes = [
        {"name": name, **mesh_balance(gpt2_shapes(), shape, spread, **kwargs)}
        for name, shape in MESHES.items() for spread in (False, True)
    ]
    print("\nGPT-2 small on N-D meshes (owner work, and all work with elementwise pieces):")
    print("| mesh | owners | owned max/mean | all work max/mean |\n|---|---|---:|---:|")
    for row in meshes:
        mode = "spread over replicas" if row["spread"] else "one per replica group"
        print(f"| {row['name']} | {mode} | {row['owned_max_over_mean']:.3f} | {row['max_over_mean']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"soap_kwargs": kwargs, "reports": reports, "meshes": meshes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
