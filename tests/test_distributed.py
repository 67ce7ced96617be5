"""FSDP2 and sharded DDP on 2 gloo ranks, compared with a one-process run bit for bit.

Every scenario runs in one 2-rank job per module (see distributed_harness). Each compares, with
``torch.equal``, the parameters (and where it says so, the state) of the distributed run with the
one-process reference fed the same micro-batches; ``torch.optim.AdamW`` through the same harness is the
control (if it is not bitwise, the harness is wrong, not the optimizers).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from distributed_harness import OPTIMIZERS, WORLD_SIZE, Net, dcp_load, dcp_save, half_batch, loss_of, reference_run, run_job  # noqa: E402

import soap_optim  # noqa: E402

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS = 7  # crosses refreshes at steps 3 and 6 (precondition_frequency=3; step 1 only builds the basis)

MODES = ("fsdp", "ddp")
DTYPES = {"f32": torch.float32, "f64": torch.float64}
PARITY = [(o, m, "f32") for o in OPTIMIZERS for m in MODES] + [
    (o, m, "f64") for o in ("soap", "shampoo", "adafactor") for m in MODES
]


# ----------------------------------------------------------------------------- inside a rank
@functools.lru_cache(maxsize=None)
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD_SIZE,))


def _distributed(name: str, mode: str, dtype: torch.dtype):
    """(model, optimizer) as a user builds them: FSDP2's fully_shard, or DDP + process_group=."""
    model = Net(dtype)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=_mesh())
        kwargs = {}
    else:
        model = nn.parallel.DistributedDataParallel(model)
        kwargs = {} if name == "torch-adamw" else {"process_group": torch.distributed.group.WORLD}
    return model, OPTIMIZERS[name](model.parameters(), **kwargs)


def _train(model, opt, steps, dtype, rank):
    for step in steps:
        opt.zero_grad()
        x, y = half_batch(step, dtype, rank)
        loss_of(model, x, y).backward()
        opt.step()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def _params(model):
    return [_full(p) for p in model.parameters()]


def _compare(model, reference) -> dict:
    ours, theirs = _params(model), [p.detach() for p in reference.parameters()]
    return {
        "bitwise": all(torch.equal(a, b) for a, b in zip(ours, theirs)),
        "max_diff": max(float((a.double() - b.double()).abs().max().detach()) for a, b in zip(ours, theirs)),
    }


def _state_numel(opt) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.dim():
                    total += (t.to_local() if hasattr(t, "to_local") else t).numel()
    return total


def _parity(name, mode, dtype_name, rank, out_dir):
    dtype = DTYPES[dtype_name]
    model, opt = _distributed(name, mode, dtype)
    _train(model, opt, range(STEPS), dtype, rank)
    reference, reference_opt = reference_run(OPTIMIZERS[name], dtype, range(STEPS))
    return {**_compare(model, reference), "state_numel": _state_numel(opt), "reference_state_numel": _state_numel(reference_opt)}


def _nonfinite(mode, rank, out_dir):
    """A NaN from one rank (FSDP2: in rank 1's shard of fc1.weight's gradient; DDP: in rank 1's input,
    which the all-reduce spreads): both ranks raise, nothing changes anywhere, and the run then
    continues exactly as one that never saw it."""
    dtype = torch.float32
    model, opt = _distributed("soap", mode, dtype)
    _train(model, opt, range(3), dtype, rank)
    before = _params(model), [dict(s) for s in opt.state.values()]
    opt.zero_grad()
    x, y = half_batch(3, dtype, rank)
    if mode == "ddp" and rank == 1:
        x[0, 0, 0, 0] = float("nan")  # before DDP's all-reduce, which hands the NaN to every rank
    loss_of(model, x, y).backward()
    if mode == "fsdp" and rank == 1:  # after the reduce-scatter: only rank 1's shard of fc1.weight
        model.fc1.weight.grad.to_local()[-1, 0] = float("nan")
    raised = None
    try:
        opt.step()
    except FloatingPointError as error:
        raised = str(error)
    unchanged = all(torch.equal(a, b) for a, b in zip(_params(model), before[0]))
    state_unchanged = all(
        all(torch.equal(v, s[k]) if isinstance(v, torch.Tensor) else True for k, v in old.items())
        for old, s in zip(before[1], opt.state.values())
    )
    _train(model, opt, range(3, 6), dtype, rank)
    reference, _ = reference_run(OPTIMIZERS["soap"], dtype, range(6))
    return {"raised": raised, "unchanged": unchanged and state_unchanged, **_compare(model, reference)}


def _dcp_resume(mode, rank, out_dir, name="soap", build=None, spec=None):
    """get/set_optimizer_state_dict + dcp.save/load at the same world size: the resumed run continues
    bit for bit, and both equal one process. ``build(name, mode, dtype)`` and ``spec`` (the one-process
    reference's) default to this module's ``_distributed`` and ``OPTIMIZERS[name]``."""
    dtype = torch.float32
    build = build or _distributed
    model, opt = build(name, mode, dtype)
    _train(model, opt, range(4), dtype, rank)
    path = os.path.join(out_dir, f"dcp-{name}-{mode}")
    dcp_save(model, opt, path)
    _train(model, opt, range(4, STEPS), dtype, rank)

    resumed, resumed_opt = build(name, mode, dtype)
    dcp_load(resumed, resumed_opt, path)  # templates from get_state_dict (state initialised at lr 0)
    _train(resumed, resumed_opt, range(4, STEPS), dtype, rank)
    reference, _ = reference_run(spec or OPTIMIZERS[name], dtype, range(STEPS))
    same = all(torch.equal(a, b) for a, b in zip(_params(resumed), _params(model)))
    return {"resumed_equal": same, **_compare(resumed, reference)}


@torch.no_grad()
def _load_model_from(model, reference):
    for p, q in zip(model.parameters(), reference.parameters()):
        if hasattr(p, "to_local"):
            local = p.to_local()
            start = _mesh().get_local_rank() * -(-q.shape[0] // WORLD_SIZE)
            local.copy_(q.detach()[start : start + local.shape[0]])
        else:
            p.detach().copy_(q.detach())


def _from_one_process(mode, rank, out_dir):
    """A one-process state dict (after 4 steps) loads into the sharded optimizer, which continues as the
    one process would."""
    dtype = torch.float32
    reference, reference_opt = reference_run(OPTIMIZERS["soap"], dtype, range(4))
    model, opt = _distributed("soap", mode, dtype)
    _load_model_from(model, reference)
    opt.load_state_dict(reference_opt.state_dict())
    _train(model, opt, range(4, STEPS), dtype, rank)
    reference_run(OPTIMIZERS["soap"], dtype, range(4, STEPS), model=reference, opt=reference_opt)
    return _compare(model, reference)


def _to_one_process(mode, rank, out_dir):
    """consolidate_state_dict(to=0) after 4 sharded steps loads into a one-process optimizer, which
    continues as the one-process run."""
    dtype = torch.float32
    model, opt = _distributed("soap", mode, dtype)
    _train(model, opt, range(4), dtype, rank)
    full = opt.consolidate_state_dict(to=0)
    params = _params(model)
    if rank != 0:
        return {"none_elsewhere": full is None}
    single = Net(dtype)
    with torch.no_grad():
        for p, q in zip(single.parameters(), params):
            p.copy_(q)
    single_opt = OPTIMIZERS["soap"](single.parameters())
    single_opt.load_state_dict(full)
    reference_run(OPTIMIZERS["soap"], dtype, range(4, STEPS), model=single, opt=single_opt)
    reference, _ = reference_run(OPTIMIZERS["soap"], dtype, range(STEPS))
    return _compare(single, reference)


def _unsupported(rank, out_dir):
    """What is not supported says so at construction, on every rank, before any step."""
    from torch.distributed.tensor import Shard, distribute_tensor

    messages = {}

    def refused(name, build):
        try:
            build()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)

    row = nn.Parameter(distribute_tensor(torch.randn(4, 6), _mesh(), [Shard(0)]))
    refused("mixed", lambda: soap_optim.SOAP([row, nn.Parameter(torch.randn(3))]).step())
    refused("process-group", lambda: soap_optim.SOAP([row], process_group=torch.distributed.group.WORLD).step())
    return messages


def _owns_nothing(rank, out_dir):
    """Sharded DDP where one rank owns no parameter at all: DCP's get/set_optimizer_state_dict (which step
    an optimizer whose state is empty) still complete on every rank, and the resumed run continues."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(6, 3, bias=False))
    opt = soap_optim.SOAP(model.parameters(), lr=1e-2, process_group=torch.distributed.group.WORLD)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x[rank * 4 : rank * 4 + 4]).square().mean().backward()
        opt.step()
    saved = get_optimizer_state_dict(model, opt)
    set_optimizer_state_dict(model, opt, saved)
    owned = sum(1 for state in opt.state.values() if state)
    return {"owned": owned, "finished": True}


SCENARIOS = {f"parity-{o}-{m}-{d}": functools.partial(_parity, o, m, d) for o, m, d in PARITY}
SCENARIOS["unsupported"] = _unsupported
SCENARIOS["owns-nothing"] = _owns_nothing
for _mode in MODES:
    SCENARIOS[f"nonfinite-{_mode}"] = functools.partial(_nonfinite, _mode)
    SCENARIOS[f"dcp-{_mode}"] = functools.partial(_dcp_resume, _mode)
    SCENARIOS[f"from-one-process-{_mode}"] = functools.partial(_from_one_process, _mode)
    SCENARIOS[f"to-one-process-{_mode}"] = functools.partial(_to_one_process, _mode)


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def job():
    return run_job("test_distributed", list(SCENARIOS))


def _records(job, name):
    records = job[name]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank}:\n{record.get('error')}"
    return [record["checks"] for record in records]


@pytest.mark.parametrize("name,mode,dtype", PARITY, ids=[f"{o}-{m}-{d}" for o, m, d in PARITY])
def test_bitwise_parity_with_one_process(job, name, mode, dtype):
    checks = _records(job, f"parity-{name}-{mode}-{dtype}")
    for rank, check in enumerate(checks):
        assert check["bitwise"], f"rank {rank}: max difference {check['max_diff']}"
    if name != "torch-adamw":
        # each rank keeps state only for its share: together exactly the one process's state
        per_rank = [check["state_numel"] for check in checks]
        assert sum(per_rank) == checks[0]["reference_state_numel"], per_rank
        assert max(per_rank) < checks[0]["reference_state_numel"], per_rank


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_gradient_on_one_rank_raises_on_every_rank(job, mode):
    for rank, check in enumerate(_records(job, f"nonfinite-{mode}")):
        assert check["raised"] and "non-finite gradient" in check["raised"], (rank, check["raised"])
        if mode == "fsdp":  # fc1.weight (after mix, conv.weight, conv.bias), named on both ranks
            assert "parameter 3 of param group 0 (shape (7, 36))" in check["raised"]
        assert check["unchanged"], rank
        assert check["bitwise"], (rank, check["max_diff"])


@pytest.mark.parametrize("mode", MODES)
def test_dcp_resume_is_bitwise(job, mode):
    for rank, check in enumerate(_records(job, f"dcp-{mode}")):
        assert check["resumed_equal"], rank
        assert check["bitwise"], (rank, check["max_diff"])


@pytest.mark.parametrize("mode", MODES)
def test_one_process_state_dict_loads_into_sharded(job, mode):
    for rank, check in enumerate(_records(job, f"from-one-process-{mode}")):
        assert check["bitwise"], (rank, check["max_diff"])


@pytest.mark.parametrize("mode", MODES)
def test_consolidated_state_dict_loads_into_one_process(job, mode):
    first, second = _records(job, f"to-one-process-{mode}")
    assert second["none_elsewhere"]
    assert first["bitwise"], first["max_diff"]


def test_unsupported_layouts_are_refused_with_a_clear_error(job):
    for messages in _records(job, "unsupported"):
        assert "cannot be mixed with plain tensors" in messages["mixed"]
        assert "process_group= is for DDP" in messages["process-group"]


def test_a_rank_that_owns_nothing_still_checkpoints(job):
    records = _records(job, "owns-nothing")
    assert sorted(r["owned"] for r in records) == [0, 1]  # one weight: one owner, and the other rank idle
    assert all(r["finished"] for r in records)
