"""SOAP's optimizer step under each way of running it on several ranks: time, communication and memory.

    python benchmarks/distributed.py                                    # one process (world size 1)
    torchrun --nproc-per-node 2 benchmarks/distributed.py [--device cpu|cuda] [--steps 20] [--width 64]

The model and data are the benchmark's (``soap_optim.bench.tasks``: the byte-level GPT on bytes of the
standard library's Python sources) and SOAP gets the benchmark's shared hyperparameters
(``soap_optim.bench.optimizers``) with a refresh every ``--precondition-frequency`` (10) steps; the
timed steps follow ``--warmup`` (2) untimed ones and include the refreshes. Each rank trains on its
slice of one global batch. Modes (``--modes``; by default ``one-process`` at world size 1 and the other
four above it):

* ``one-process``: ``soap_optim.SOAP`` on a plain model (world size 1);
* ``ddp``: ``DistributedDataParallel`` and ``soap_optim.SOAP`` without ``process_group``: every rank steps
  every parameter (the one-process work, on each rank);
* ``zero``: DDP and ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=soap_optim.SOAP)``:
  parameters assigned by element count, one broadcast per parameter after the step;
* ``sharded-ddp``: DDP and ``soap_optim.SOAP(process_group=WORLD)``: one owner per parameter by SOAP's cost,
  one all_gather of the new values;
* ``fsdp2``: ``fully_shard`` (each block, then the root) and ``soap_optim.SOAP``: elementwise parameters step
  their local rows, the rest go to cost-balanced owners through two all_to_all_single calls.
* ``hsdp`` / ``hsdp-spread``: ``fully_shard`` on a ``(2, W/2)`` ``(replicate, shard)`` mesh; each replica
  group steps its own owners, or (``shard_over_replicas=True``) the owners are spread over the replicas.
* ``fsdp-tp`` / ``fsdp-tp-spread``: a ``(W/2, 2)`` ``(dp, tp)`` mesh: each block's MLP colwise/rowwise
  tensor parallel on ``tp``, then ``fully_shard`` on ``dp``; the two ranks of a ``tp`` pair train on the same
  slice of the batch. Parameters without tensor parallelism are replicated over ``tp``: their owners are
  one per ``tp`` rank, or spread over both (``shard_over_replicas=True``).
  (Mesh modes are chosen with ``--modes``, e.g. ``--modes fsdp2,hsdp,hsdp-spread,fsdp-tp`` at 4 ranks.)

Only ``opt.step()`` is timed (forward and backward, DDP's gradient all-reduce and FSDP2's gathers are
not), after a barrier so that ranks enter the step together. For soap_optim's modes the time inside the
step's collectives comes from the optimizer's own counters (``opt._distribution.stats``: calls, bytes
sent to plus received from other ranks, seconds) and compute is the step's time minus it.
For ZeRO the broadcasts are timed by wrapping its ``_sync_params`` (the step's last phase: start every
broadcast, wait for all), and its bytes are each broadcast tensor once per rank (what a rank sends as
the source or receives otherwise). Rank 0 gathers every rank's numbers, prints one table and writes
``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

if importlib.util.find_spec("soap_optim") is None:  # not installed: use this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import soap_optim  # noqa: E402
from soap_optim.bench import optimizers, tasks  # noqa: E402
from soap_optim.bench.suite import Settings  # noqa: E402

DISTRIBUTED_MODES = ("ddp", "zero", "sharded-ddp", "fsdp2")
MESH_MODES = ("hsdp", "hsdp-spread", "fsdp-tp", "fsdp-tp-spread")  # 2-D meshes: an even world size >= 4
ALL_MODES = ("one-process",) + DISTRIBUTED_MODES + MESH_MODES
MB = 1e6


# ------------------------------------------------------------------------------------ setup
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu (gloo) or cuda (NCCL, one GPU per rank); default: cuda when available")
    parser.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(ALL_MODES)}")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes this many times, rotating their order, and pool the steps (default: 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--width", type=int, default=defaults.width, help=f"GPT width (default: {defaults.width})")
    parser.add_argument("--depth", type=int, default=defaults.depth, help=f"GPT blocks (default: {defaults.depth})")
    parser.add_argument("--context", type=int, default=defaults.context, help=f"GPT context (default: {defaults.context})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"global batch, split over ranks (default: {defaults.batch_size})")
    parser.add_argument("--precondition-frequency", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: torch's)")
    parser.add_argument("--timeout", type=float, default=300.0, help="process-group timeout in seconds (default: 300)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a one-process run's --out JSON: ratios are also given against it")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here (rank 0)")
    args = parser.parse_args(argv)
    if args.width % 4:
        parser.error(f"--width must be a multiple of 4, got {args.width}")
    return args


def init(args) -> Dict[str, Any]:
    """Process group (when launched by torchrun), device and the world's facts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout), **kwargs)
    rank = dist.get_rank() if launched else 0
    return {"world": world, "rank": rank, "device": device, "launched": launched}


def chosen_modes(args, world: int) -> List[str]:
    if args.modes:
        modes = [m for m in args.modes.split(",") if m]
        unknown = [m for m in modes if m not in ALL_MODES]
        if unknown:
            raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
        if world > 1 and "one-process" in modes:
            raise SystemExit("one-process is the world-size-1 mode: run it with `python benchmarks/distributed.py`")
        if world == 1 and any(m != "one-process" for m in modes) and "RANK" not in os.environ:
            raise SystemExit("the distributed modes need a process group: launch with torchrun")
        return modes
    return ["one-process"] if world == 1 else list(DISTRIBUTED_MODES)


def soap_kwargs(args) -> Dict[str, Any]:
    """The benchmark's SOAP keyword arguments (soap_optim.bench.optimizers), with our refresh period."""
    spec = next(s for s in optimizers.ours() if s.key == "soap")
    return spec.kwargs(optimizers.Hyper(precondition_frequency=args.precondition_frequency))


def training_windows(args, world: int, rank: int) -> Callable[[int], torch.Tensor]:
    """This rank's slice of step ``i``'s global batch of byte windows."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} ranks")
    per_rank = args.batch_size // world
    total_steps = args.warmup + args.steps
    try:
        corpus = tasks.load_stdlib_corpus(train_bytes=200_000, heldout_bytes=1_000)
        text = corpus.train
    except RuntimeError:  # a Python without its .py sources: random bytes time the same
        text = torch.randint(0, tasks.VOCAB, (200_000,), generator=torch.Generator().manual_seed(args.seed))
    starts = tasks.batch_starts(len(text), total_steps, args.batch_size, args.context, args.seed)
    mine = starts[:, rank * per_rank : (rank + 1) * per_rank]
    return lambda step: tasks.windows_at(text, mine[step], args.context)


# ------------------------------------------------------------------------------------ one mode
_MESHES: Dict[tuple, Any] = {}


def two_d_mesh(device: torch.device, shape, names):
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, tuple(shape), tuple(names))
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, tuple(shape), mesh_dim_names=tuple(names))
    return _MESHES[key]


def build_on_mesh(mode: str, model, device: torch.device, world: int, kwargs):
    from torch.distributed.fsdp import fully_shard

    if world % 2 or world < 4:
        raise SystemExit(f"mode {mode} needs an even world size of at least 4, got {world}")
    if mode in ("hsdp", "hsdp-spread"):
        mesh = two_d_mesh(device, (2, world // 2), ("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = soap_optim.SOAP(model.parameters(), shard_over_replicas=mode == "hsdp-spread", **kwargs)
        return model, opt, opt
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = two_d_mesh(device, (world // 2, 2), ("dp", "tp"))
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {"mlp_in": ColwiseParallel(), "mlp_out": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = soap_optim.SOAP(model.parameters(), shard_over_replicas=mode == "fsdp-tp-spread", **kwargs)
    return model, opt, opt


def build(mode: str, args, device: torch.device, mesh):
    """(model, optimizer, inner SOAP) for ``mode``; the inner SOAP is the one holding this rank's state."""
    torch.manual_seed(args.seed)
    model = tasks.gpt(args.width, args.depth, args.context).to(device)
    kwargs = soap_kwargs(args)
    if mode in MESH_MODES:
        return build_on_mesh(mode, model, device, dist.get_world_size(), kwargs)
    if mode == "one-process":
        opt = soap_optim.SOAP(model.parameters(), **kwargs)
        return model, opt, opt
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = soap_optim.SOAP(model.parameters(), **kwargs)
        return model, opt, opt
    ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if mode == "ddp":
        opt = soap_optim.SOAP(model.parameters(), **kwargs)
        return model, opt, opt
    if mode == "sharded-ddp":
        opt = soap_optim.SOAP(model.parameters(), process_group=dist.group.WORLD, **kwargs)
        return model, opt, opt
    if mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=soap_optim.SOAP, **kwargs)
        return model, opt, opt.optim
    raise ValueError(mode)


class ZeroSyncTimer:
    """Times ZeroRedundancyOptimizer's ``_sync_params`` (all its broadcasts and their waits) per step."""

    def __init__(self, zero) -> None:
        self.seconds = 0.0
        self.on_cuda = next(zero._all_params.__iter__()).is_cuda
        original = zero._sync_params

        def timed():
            if self.on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            original()
            if self.on_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start

        zero._sync_params = timed
        # one broadcast per parameter (parameters_as_bucket_view=False, the default), each tensor once here
        self.collectives = len(zero._all_params)
        self.bytes = sum(p.numel() * p.element_size() for p in zero._all_params)


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a state entry (a DTensor's local shard)."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def cost_share(mode: str, opt, inner, world: int, rank: int) -> Dict[str, Any]:
    """What SOAP's cost model says this rank steps: the fraction of the whole model's cost, and counts."""
    hyper = inner._check_group(inner.param_groups[0])
    params = [p for g in opt.param_groups for p in g["params"]]
    costs = [inner._cost(p.shape, hyper) for p in params]
    total = sum(costs)
    if mode in ("one-process", "ddp"):
        return {"cost_fraction": 1.0, "owned": len(params), "local": 0}
    if mode == "zero":
        mine = {id(p) for g in inner.param_groups for p in g["params"]}
        share = sum(c for p, c in zip(params, costs) if id(p) in mine)
        return {"cost_fraction": share / total, "owned": len(mine), "local": 0}
    distribution = opt._distribution
    share, owned, local = 0.0, 0, 0
    for index, (param, cost) in enumerate(zip(params, costs)):
        role = distribution.role(index)
        if role.is_local:
            fraction = role.layout.regions[distribution.rank].numel / max(1, param.numel())
            share, local = share + cost * fraction, local + 1
        elif distribution.rank in role.owners():
            share, owned = share + cost, owned + 1
    return {"cost_fraction": share / total, "owned": owned, "local": local}


def run_mode(mode: str, args, env: Dict[str, Any], mesh) -> Dict[str, Any]:
    device, world, rank = env["device"], env["world"], env["rank"]
    model, opt, inner = build(mode, args, device, mesh)
    full_params = [p for p in model.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in full_params)  # DTensors: their global shape
    local_params = [p.to_local() if hasattr(p, "to_local") else p for p in full_params]
    local_param_bytes = sum(p.numel() * p.element_size() for p in local_params)
    if mode.startswith("fsdp-tp"):  # the two ranks of a tensor-parallel pair see the same data
        windows_of = training_windows(args, world // 2, rank // 2)
    else:
        windows_of = training_windows(args, world, rank)
    stats = getattr(getattr(opt, "_distribution", None), "stats", None)
    calls: List[Dict[str, Any]] = []  # this step's collectives, one by one (soap_optim's modes)
    if stats is not None:
        count_call = stats.run

        def run_and_record(collective, *tensors, **kwargs):
            before_seconds, before_bytes = stats.seconds, stats.bytes
            count_call(collective, *tensors, **kwargs)
            calls.append({"collective": getattr(collective, "__name__", str(collective)),
                          "bytes": stats.bytes - before_bytes,  # sent to + received from other ranks
                          "seconds": stats.seconds - before_seconds})

        stats.run = run_and_record
    zero_timer = ZeroSyncTimer(opt) if mode == "zero" else None
    on_cuda = device.type == "cuda"
    frequency = args.precondition_frequency
    steps: List[Dict[str, Any]] = []
    loss_value = math.nan
    for index in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=True)
        loss = tasks.next_byte_loss(model, windows_of(index).to(device))
        loss.backward()
        loss_value = float(loss.detach())
        if env["launched"]:
            dist.barrier()
        if on_cuda:
            torch.cuda.synchronize()
        if stats is not None:
            stats.reset()
            calls.clear()
        if zero_timer is not None:
            zero_timer.seconds = 0.0
        start = time.perf_counter()
        opt.step()
        if on_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if index < args.warmup:
            continue
        call = index + 1  # SOAP's step counter reads call - 1 during call; it refreshes when that is k * f
        if stats is not None:
            comm = {"seconds": stats.seconds, "bytes": stats.bytes, "collectives": stats.collectives}
        elif zero_timer is not None:
            comm = {"seconds": zero_timer.seconds, "bytes": zero_timer.bytes, "collectives": zero_timer.collectives}
        else:
            comm = {"seconds": 0.0, "bytes": 0, "collectives": 0}
        steps.append({"call": call, "refresh": call > 1 and (call - 1) % frequency == 0, "step_s": seconds, **comm,
                      "calls": [dict(c) for c in calls]})
    record = {
        "mode": mode,
        "rank": rank,
        "world_size": world,
        "param_bytes": param_bytes,
        "local_param_bytes": local_param_bytes,
        "parameters": sum(p.numel() for p in full_params),
        "state_bytes": sum(tensor_bytes(entry) for entry in inner.state.values()),
        "final_loss": loss_value,
        **cost_share(mode, opt, inner, world, rank),
        "steps": steps,
    }
    if mode == "zero":
        record["note"] = "step_s includes ZeRO's broadcasts; compute_s is step_s minus the timed _sync_params"
    del model, opt, inner
    if env["launched"]:
        dist.barrier()
    return record


def summarize(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with its per-step numbers averaged (compute: step time minus time in collectives)."""
    steps = record["steps"]
    refresh = [s for s in steps if s["refresh"]]
    plain = [s for s in steps if not s["refresh"]]
    mean = lambda rows, key: statistics.fmean(r[key] for r in rows) if rows else math.nan  # noqa: E731
    compute = lambda rows: [r["step_s"] - r["seconds"] for r in rows]  # noqa: E731
    kinds: Dict[str, Dict[str, float]] = {}
    for s in steps:
        for c in s["calls"]:
            kind = kinds.setdefault(c["collective"], {"calls_per_step": 0.0, "bytes_per_step": 0.0, "seconds_per_step": 0.0})
            kind["calls_per_step"] += 1 / len(steps)
            kind["bytes_per_step"] += c["bytes"] / len(steps)
            kind["seconds_per_step"] += c["seconds"] / len(steps)
    return {
        **record,
        "timed_steps": len(steps),
        "refresh_steps": len(refresh),
        "step_s": mean(steps, "step_s"),
        "compute_s": statistics.fmean(compute(steps)),
        "compute_s_plain_median": statistics.median(compute(plain)) if plain else math.nan,
        "compute_s_refresh_mean": statistics.fmean(compute(refresh)) if refresh else math.nan,
        "collective_s": mean(steps, "seconds"),
        "bytes_per_step": mean(steps, "bytes"),
        "bytes_over_param_bytes": mean(steps, "bytes") / record["param_bytes"],
        "bytes_over_local_param_bytes": mean(steps, "bytes") / record["local_param_bytes"],
        "collectives_per_step": mean(steps, "collectives"),
        "collective_kinds": kinds,
    }


def run_all(modes: List[str], args, env: Dict[str, Any], mesh) -> List[Dict[str, Any]]:
    """Every mode ``--repeats`` times, the order rotated each round (so that a machine that slows down
    part-way does not load one mode), and each mode's timed steps pooled over the rounds."""
    pooled: Dict[str, Dict[str, Any]] = {}
    for round_index in range(args.repeats):
        shift = round_index % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            record = run_mode(mode, args, env, mesh)
            if mode in pooled:
                pooled[mode]["steps"] += record["steps"]
            else:
                pooled[mode] = record
    return [summarize(pooled[mode]) for mode in modes]


# ------------------------------------------------------------------------------------ report
def table(records: List[Dict[str, Any]]) -> str:
    lines = [
        "| mode | rank | step ms | compute ms | refresh-step compute ms | collective ms | collectives/step | "
        "MB/step | x param bytes | state MB | cost share | owned + local params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['rank']} | {1e3 * r['step_s']:.2f} | {1e3 * r['compute_s']:.2f} | "
            f"{1e3 * r['compute_s_refresh_mean']:.2f} | {1e3 * r['collective_s']:.2f} | {r['collectives_per_step']:.0f} | "
            f"{r['bytes_per_step'] / MB:.3f} | {r['bytes_over_param_bytes']:.2f} | {r['state_bytes'] / MB:.3f} | "
            f"{r['cost_fraction']:.3f} | {r['owned']} + {r['local']} |"
        )
    return "\n".join(lines)


def kinds_table(records: List[Dict[str, Any]]) -> str:
    lines = ["| mode | rank | collective | calls/step | bytes/step | ms/step |", "|---|---:|---|---:|---:|---:|"]
    for r in records:
        for name, k in r.get("collective_kinds", {}).items():
            lines.append(f"| {r['mode']} | {r['rank']} | {name} | {k['calls_per_step']:.0f} | "
                         f"{k['bytes_per_step']:,.0f} | {1e3 * k['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def ratios(records: List[Dict[str, Any]], reference: Optional[Dict[str, float]], label: str) -> List[Dict[str, Any]]:
    """Per distributed mode, the worst rank's state and compute against ``reference`` (state bytes and
    amortized compute seconds of the full SOAP step)."""
    out = []
    if not reference:
        return out
    for mode in dict.fromkeys(r["mode"] for r in records):
        if mode in ("one-process", "ddp") and label == "ddp":
            continue
        rows = [r for r in records if r["mode"] == mode]
        out.append({
            "mode": mode,
            "against": label,
            "state_ratio_max_rank": max(r["state_bytes"] for r in rows) / reference["state_bytes"],
            "compute_ratio_max_rank": max(r["compute_s"] for r in rows) / reference["compute_s"],
            "step_ratio_max_rank": max(r["step_s"] for r in rows) / reference["compute_s"],
            "bytes_over_param_bytes_max_rank": max(r["bytes_over_param_bytes"] for r in rows),
        })
    return out


def ratio_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| mode | against | state (worst rank) | compute (worst rank) | whole step (worst rank) | bytes / param bytes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['against']} | {r['state_ratio_max_rank']:.3f}x | {r['compute_ratio_max_rank']:.3f}x | "
            f"{r['step_ratio_max_rank']:.3f}x | {r['bytes_over_param_bytes_max_rank']:.2f} |"
        )
    return "\n".join(lines)


def reference_of(records: List[Dict[str, Any]], mode: str) -> Optional[Dict[str, float]]:
    rows = [r for r in records if r["mode"] == mode]
    if not rows:
        return None
    return {"state_bytes": statistics.fmean(r["state_bytes"] for r in rows),
            "compute_s": statistics.fmean(r["compute_s"] for r in rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    env = init(args)
    modes = chosen_modes(args, env["world"])
    mesh = None
    if "fsdp2" in modes:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(env["device"].type, (env["world"],))
    records = run_all(modes, args, env, mesh)
    if env["launched"]:
        gathered = [None] * env["world"] if env["rank"] == 0 else None
        dist.gather_object(records, gathered, dst=0)
    else:
        gathered = [records]
    if env["rank"] == 0:
        everything = sorted((r for per_rank in gathered for r in per_rank), key=lambda r: (modes.index(r["mode"]), r["rank"]))
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        comparisons = ratios(everything, reference_of(everything, "ddp"), "ddp")
        if args.baseline:
            baseline = json.loads(args.baseline.read_text())
            comparisons += ratios(everything, reference_of(baseline["records"], "one-process"), "one-process")
        print(f"SOAP optimizer step, world size {env['world']}, {env['device']}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s) per rank; GPT width {args.width}, depth {args.depth}, "
              f"context {args.context}, global batch {args.batch_size}; {args.steps} timed steps after "
              f"{args.warmup}, refresh every {args.precondition_frequency}")
        print(f"parameters: {everything[0]['parameters']:,} ({everything[0]['param_bytes'] / MB:.3f} MB)")
        print(table(everything))
        if any(r.get("collective_kinds") for r in everything):
            print("\nsoap_optim's collectives inside the step, by kind")
            print(kinds_table(everything))
        if comparisons:
            print("\nworst rank against the full step (ddp: the same SOAP on every rank, run alongside; "
                  "one-process: --baseline)")
            print(ratio_table(comparisons))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "settings": settings,
                "soap_kwargs": optimizers._jsonable(soap_kwargs(args)),
                "world_size": env["world"],
                "device": str(env["device"]),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "records": everything,
                "comparisons": comparisons,
            }, indent=2))
    if env["launched"]:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
