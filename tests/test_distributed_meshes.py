"""Every mesh users scale to, on 4 gloo ranks: HSDP (both replicate modes), FSDP x tensor parallelism,
FSDP2 with ``Shard(1)``, a 3-D mesh, compared with one process bit for bit.

Gradient reductions over 4 ranks (and tensor parallelism's partial sums) have no micro-batch twin, so the
reference replays the distributed run's own gradients, gathered whole, into a one-process optimizer
(``distributed_harness.Replay``) and compares whole parameters with ``torch.equal`` after every step;
``torch.optim.AdamW`` through the same harness is the control. One 4-rank job runs every scenario.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from distributed_harness import OPTIMIZERS, Net, Replay, batch, dcp_load, dcp_save, run_job  # noqa: E402


if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 4
STEPS = 5  # refreshes at steps 3 (precondition_frequency=3); Shampoo's roots at 2 and 4



class TPNet(nn.Module):
    """Colwise then rowwise linear layers (tensor parallel), a LayerNorm and a head that only FSDP shards
    (so parameters live on the (dp, tp) mesh and on its dp slice), an uneven 7-row matrix."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(75, 12)
        self.down = nn.Linear(12, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 7)
        self.to(dtype)

    def forward(self, x):
        hidden = self.down(torch.tanh(self.up(x.flatten(1))))
        return self.head(torch.tanh(self.norm(hidden)))


# ----------------------------------------------------------------------------- inside a rank
@functools.lru_cache(maxsize=None)
def _mesh(shape, names):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _build(kind: str, name: str, dtype, spread: bool):
    """(model, optimizer, which data-parallel batch this rank trains on) as a user builds them."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    kwargs = {} if name == "torch-adamw" else {"shard_over_replicas": spread}
    rank = torch.distributed.get_rank()
    if kind == "hsdp":
        model = Net(dtype)
        fully_shard(model, mesh=_mesh((2, 2), ("replicate", "shard")))
        return model, OPTIMIZERS[name](model.parameters(), **kwargs), rank, WORLD
    if kind == "shard1":
        model = Net(dtype)
        fully_shard(
            model, mesh=_mesh((WORLD,), ("shard",)),
            # FSDP2 shards dim 1 only evenly: fc1 and gate (36 columns) get Shard(1), the rest Shard(0)
            shard_placement_fn=lambda p: Shard(1) if p.dim() >= 2 and p.shape[1] % WORLD == 0 else Shard(0),
        )
        return model, OPTIMIZERS[name](model.parameters(), **kwargs), rank, WORLD
    if kind in ("tp", "3d"):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = TPNet(dtype)
        if kind == "tp":
            mesh = _mesh((2, 2), ("dp", "tp"))
            dp = mesh["dp"]
        else:
            mesh = _mesh((1, 2, 2), ("dp_replicate", "dp_shard", "tp"))
            dp = mesh["dp_replicate", "dp_shard"]
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=dp)
        coordinate = mesh.get_coordinate()
        return model, OPTIMIZERS[name](model.parameters(), **kwargs), coordinate[-2], 2
    raise ValueError(kind)


def _data(step, dtype, part, parts):
    x, _ = batch(step, dtype)
    gen = torch.Generator().manual_seed(200 + step)
    y = torch.randn(x.shape[0], 7, generator=gen).to(dtype)
    size = x.shape[0] // parts
    return x[part * size : (part + 1) * size], y[part * size : (part + 1) * size]


def _loss(model, x, y):
    out = model(x)
    return (out[:, : y.shape[1]] - y).square().mean()


def _parity(kind, name, dtype_name, spread, rank, out_dir):
    dtype = {"f32": torch.float32, "f64": torch.float64}[dtype_name]
    model, opt, part, parts = _build(kind, name, dtype, spread)
    replay = Replay(list(model.parameters()), OPTIMIZERS[name])
    worst = {"bitwise": True, "max_diff": 0.0}
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, *_data(step, dtype, part, parts)).backward()
        replay.step(list(model.parameters()))
        opt.step()
        check = replay.compare(list(model.parameters()))
        worst = {"bitwise": worst["bitwise"] and check["bitwise"], "max_diff": max(worst["max_diff"], check["max_diff"])}
    placements = sorted({str(tuple(p.placements)) for p in model.parameters()})
    consolidated = None
    if name != "torch-adamw":  # the whole state, gathered on rank 0, is the one process's
        whole = opt.consolidate_state_dict(to=0)
        if rank == 0:
            consolidated = _same_state(replay.optimizer.state_dict()["state"], whole["state"])
    return {**worst, "state_bytes": _state_bytes(opt), "reference_state_bytes": _state_bytes(replay.optimizer),
            "placements": placements, "consolidated": consolidated}


def _state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.dim():
                    local = t.to_local() if hasattr(t, "to_local") else t
                    total += local.numel() * local.element_size()
    return total


def _nonfinite(rank, out_dir):
    """A NaN in rank 3's batch only (HSDP): every rank raises, nothing changes anywhere."""
    model, opt, part, parts = _build("hsdp", "soap", torch.float32, False)
    for step in range(2):
        opt.zero_grad()
        _loss(model, *_data(step, torch.float32, part, parts)).backward()
        opt.step()
    before = [p.detach().to_local().clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = _data(2, torch.float32, part, parts)
    if rank == 3:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    _loss(model, x, y).backward()
    try:
        opt.step()
        raised = None
    except FloatingPointError as error:
        raised = str(error)
    unchanged = all(torch.equal(a, p.detach().to_local()) for a, p in zip(before, model.parameters()))
    return {"raised": raised, "unchanged": unchanged}


def _checkpoint_across_meshes(rank, out_dir):
    """DCP save on HSDP (2, 2), load on a 1-D 4-rank FSDP2 mesh and on one process: the loaded state is the
    saved one bit for bit (compared whole, through full_state_dict); then back to HSDP in the other mode."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    def train(model, opt, steps, part, parts):
        for step in steps:
            opt.zero_grad()
            _loss(model, *_data(step, torch.float32, part, parts)).backward()
            opt.step()

    def whole_state(model, opt):
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        # copies: plain 0-d entries (the step) are the optimizer's own tensors, which later steps advance
        return copy.deepcopy(full["state"])

    model, opt, part, parts = _build("hsdp", "soap", torch.float32, False)
    train(model, opt, range(4), part, parts)
    saved = whole_state(model, opt)
    path = os.path.join(out_dir, "dcp-hsdp")
    dcp_save(model, opt, path)

    results = {}
    flat = Net()
    fully_shard(flat, mesh=_mesh((WORLD,), ("shard",)))
    flat_opt = OPTIMIZERS["soap"](flat.parameters())
    dcp_load(flat, flat_opt, path)
    results["fsdp-4"] = _same_state(saved, whole_state(flat, flat_opt))
    spread, spread_opt, _, _ = _build("hsdp", "soap", torch.float32, True)
    dcp_load(spread, spread_opt, path)
    results["hsdp-spread"] = _same_state(saved, whole_state(spread, spread_opt))
    # the resumed spread run continues exactly as the original (the same mesh shape, so the same gradients)
    train(model, opt, range(4, 6), part, parts)
    train(spread, spread_opt, range(4, 6), part, parts)
    results["resumed_equal"] = all(
        torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), spread.parameters())
    )
    if rank == 0:  # one process, without the process group
        single = Net()
        single_opt = OPTIMIZERS["soap"](single.parameters())
        dcp_load(single, single_opt, path, no_dist=True)
        names = dict(zip([id(p) for p in single.parameters()], [n for n, _ in single.named_parameters()]))
        one = {names[id(p)]: single_opt.state[p] for p in single.parameters()}
        results["one-process"] = _same_state(saved, one)
    return results


def _same_state(a, b) -> bool:
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k2: v2 for k, v in value.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        if isinstance(value, (list, tuple)):
            return {k2: v2 for i, v in enumerate(value) for k2, v2 in flat(v, f"{prefix}{i}.").items()}
        return {prefix: value}

    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return False
    for key, value in fa.items():
        other = fb[key]
        if isinstance(value, torch.Tensor):
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            other = other.full_tensor() if hasattr(other, "full_tensor") else other
            if not isinstance(other, torch.Tensor) or not torch.equal(value.cpu().to(other.dtype), other.cpu()):
                return False
        elif value != other:
            return False
    return True


PARITY = (
    [("hsdp", o, "f32", False) for o in OPTIMIZERS]
    + [("hsdp", o, "f32", True) for o in ("soap", "soap-one-sided", "shampoo", "adafactor", "adamw")]
    + [("tp", o, "f32", False) for o in OPTIMIZERS]
    + [("shard1", o, "f32", False) for o in ("torch-adamw", "soap", "soap-merge-1d", "shampoo", "adamw", "adafactor")]
    + [("3d", o, "f32", s) for o in ("torch-adamw", "soap") for s in (False, True)]
    + [(k, "soap", "f64", s) for k in ("hsdp", "tp") for s in (False, True)]
)


def _parity_id(kind, name, dtype, spread):
    return f"{kind}-{name}-{dtype}" + ("-spread" if spread else "")


SCENARIOS = {_parity_id(*args): functools.partial(_parity, *args) for args in PARITY}
SCENARIOS["nonfinite"] = _nonfinite
SCENARIOS["checkpoint-across-meshes"] = _checkpoint_across_meshes


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def job():
    return run_job(__name__.split(".")[-1], list(SCENARIOS), world_size=WORLD)


def _records(job, name):
    records = job[name]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank} failed:\n{record.get('error')}"
    return [record["checks"] for record in records]


@pytest.mark.parametrize("kind,name,dtype,spread", PARITY, ids=[_parity_id(*a) for a in PARITY])
def test_bitwise_parity_with_one_process(job, kind, name, dtype, spread):
    for rank, check in enumerate(_records(job, _parity_id(kind, name, dtype, spread))):
        assert check["bitwise"], f"rank {rank}: max difference {check['max_diff']} (placements {check['placements']})"
        if rank == 0 and name != "torch-adamw":
            assert check["consolidated"], "consolidate_state_dict(to=0) differs from the one-process state"


def test_meshes_really_are_what_they_claim(job):
    """The scenarios exercise the placements they are named after."""
    placements = {kind: _records(job, _parity_id(kind, "soap", "f32", False))[0]["placements"] for kind in ("hsdp", "tp", "shard1", "3d")}
    assert any("Replicate" in p and "Shard(dim=0)" in p for p in placements["hsdp"])
    assert any("Shard(dim=1)" in p for p in placements["shard1"])
    assert any("_StridedShard" in p or "Shard(dim=0), Shard(dim=0)" in p for p in placements["tp"])
    assert any("Shard(dim=0), Shard(dim=1)" in p for p in placements["tp"])
    assert any(len(eval_placement_count(p)) == 3 for p in placements["3d"])


def eval_placement_count(text):
    return [part for part in text.strip("()").split("), ") if part]


def test_spreading_owners_over_replicas_divides_the_state(job):
    """HSDP (2, 2): by default each replica keeps its owners' state (about half of one process's per
    rank); spread over the replicas, about a quarter."""
    default = _records(job, _parity_id("hsdp", "soap", "f32", False))
    spread = _records(job, _parity_id("hsdp", "soap", "f32", True))
    reference = default[0]["reference_state_bytes"]
    assert max(c["state_bytes"] for c in default) <= 0.7 * reference
    assert max(c["state_bytes"] for c in spread) <= 0.45 * reference
    assert sum(c["state_bytes"] for c in spread) < sum(c["state_bytes"] for c in default)


def test_nonfinite_gradient_on_one_rank_raises_on_every_rank(job):
    for rank, check in enumerate(_records(job, "nonfinite")):
        assert check["raised"] and "non-finite gradient" in check["raised"], (rank, check["raised"])
        assert check["unchanged"], rank


def test_checkpoints_move_between_meshes_losslessly(job):
    for rank, check in enumerate(_records(job, "checkpoint-across-meshes")):
        assert check["fsdp-4"], rank
        assert check["hsdp-spread"], rank
        assert check["resumed_equal"], rank
        if rank == 0:
            assert check["one-process"]
