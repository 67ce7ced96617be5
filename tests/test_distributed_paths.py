"""The paths users really take, on 2 gloo ranks: accelerate's and HF Trainer's FSDP2 parameter swap, FSDP1
and DeepSpeed-style flat parameters, full-state-dict checkpoints, rank-0 saves under sharded DDP, and
checkpoints taken right after a load. Compared with one process bit for bit (the micro-batch reference of
``distributed_harness``), with ``torch.optim.AdamW`` as the control.
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
from distributed_harness import OPTIMIZERS as HARNESS_OPTIMIZERS  # noqa: E402
from distributed_harness import WORLD_SIZE, Net, dcp_load, dcp_save, half_batch, loss_of, reference_run, run_job  # noqa: E402


if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS = 6
OPTIMIZERS = {name: HARNESS_OPTIMIZERS[name] for name in ('torch-adamw', 'soap', 'shampoo', 'adamw', 'adafactor')}


@functools.lru_cache(maxsize=None)
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


def _train(model, opt, steps, rank, dtype=torch.float32):
    for step in steps:
        opt.zero_grad()
        loss_of(model, *half_batch(step, dtype, rank)).backward()
        opt.step()


def _whole(tensor):
    return tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach()


def _compare(model, reference) -> dict:
    ours, theirs = [_whole(p) for p in model.parameters()], [p.detach() for p in reference.parameters()]
    return {
        "bitwise": all(torch.equal(a, b) for a, b in zip(ours, theirs)),
        "max_diff": max(float((a.double() - b.double()).abs().max()) for a, b in zip(ours, theirs)),
    }


def _fsdp(name):
    from torch.distributed.fsdp import fully_shard

    model = Net()
    fully_shard(model, mesh=_mesh())
    return model, OPTIMIZERS[name](model.parameters())


def _swap(name, rank, out_dir):
    """accelerate's ``fsdp2_switch_optimizer_parameters``: the optimizer is built on the plain parameters,
    then the model is sharded and the DTensors are written into ``param_groups``."""
    from torch.distributed.fsdp import fully_shard

    model = Net()
    opt = OPTIMIZERS[name](model.parameters())
    names = [n for n, _ in model.named_parameters()]
    fully_shard(model, mesh=_mesh())
    sharded = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [sharded[names[i]] for i in range(len(group["params"]))]
    _train(model, opt, range(STEPS), rank)
    reference, _ = reference_run(OPTIMIZERS[name], torch.float32, range(STEPS))
    return _compare(model, reference)


def _refusal(build):
    try:
        build()
        return None
    except ValueError as error:
        return str(error)


def _fsdp1(rank, out_dir):
    """FSDP1 hands 1-D flattened parameters: shape-dependent optimizers refuse them (both use_orig_params),
    elementwise ones accept them."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    messages = {}
    for orig in (True, False):
        model = FullyShardedDataParallel(Net(), device_id=torch.device("cpu"), use_orig_params=orig)
        for name in ("soap", "shampoo", "adafactor", "adamw"):
            messages[f"{name}-{orig}"] = _refusal(lambda: OPTIMIZERS[name](model.parameters()))
    return messages


def _deepspeed_flat(rank, out_dir):
    """DeepSpeed ZeRO-1/2 with a client optimizer: the optimizer is built on the model's parameters, then
    each group's parameters become one flat fp32 partition. The first step refuses, on every rank,
    before anything is modified."""
    model = Net()
    opt = OPTIMIZERS["soap"](model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    part = flat.chunk(WORLD_SIZE)[rank].clone()
    partition = nn.Parameter(part)
    opt.param_groups[0]["params"] = [partition]
    partition.grad = torch.ones_like(partition)
    message = _refusal(opt.step)
    return {"message": message, "unchanged": torch.equal(partition.detach(), part), "state": len(opt.state)}


def _full_state_dict(offload, broadcast, rank, out_dir):
    """get_optimizer_state_dict(full_state_dict=True) holds every parameter's whole state, and
    set_optimizer_state_dict(full_state_dict=True) restores it: the resumed run is bitwise."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _fsdp("soap")
    _train(model, opt, range(4), rank)
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    full = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    model_full = copy.deepcopy(get_model_state_dict(model, options=options))
    _, reference_opt = reference_run(OPTIMIZERS["soap"], torch.float32, range(4))
    holds = rank == 0 or not offload  # cpu_offload keeps the result on rank 0 only
    complete = None
    if holds:
        names = [n for n, _ in Net().named_parameters()]
        expected = {names[i]: v for i, v in reference_opt.state_dict()["state"].items()}
        complete = _same(expected, full["state"])
    resumed, resumed_opt = _fsdp("soap")
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    given_model = model_full if (rank == 0 or not broadcast) else {}
    given_opt = full if (rank == 0 or not broadcast) else {}
    set_model_state_dict(resumed, given_model, options=load)
    set_optimizer_state_dict(resumed, resumed_opt, given_opt, options=load)
    _train(resumed, resumed_opt, range(4, STEPS), rank)
    reference, _ = reference_run(OPTIMIZERS["soap"], torch.float32, range(STEPS))
    return {"complete": complete, **_compare(resumed, reference)}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu().float(), b.cpu().float()) and a.shape == b.shape
    return a == b


def _ddp_rank0_save(rank, out_dir):
    """Sharded DDP: the usual rank-0-only ``torch.save(opt.state_dict())`` refuses with the instruction;
    after ``consolidate_state_dict(to=0)`` rank 0's ``state_dict()`` is complete and resumes one process."""
    model = nn.parallel.DistributedDataParallel(Net())
    opt = OPTIMIZERS["soap"](model.parameters(), process_group=torch.distributed.group.WORLD)
    _train(model, opt, range(4), rank)
    result = {}
    if rank == 0:
        try:
            opt.state_dict()
            result["refused"] = None
        except RuntimeError as error:
            result["refused"] = str(error)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        saved = copy.deepcopy(opt.state_dict())
        single = Net()
        single.load_state_dict({k.removeprefix("module."): v for k, v in model.state_dict().items()})
        single_opt = OPTIMIZERS["soap"](single.parameters())
        single_opt.load_state_dict(saved)
        reference_run(OPTIMIZERS["soap"], torch.float32, range(4, STEPS), model=single, opt=single_opt)
        reference, _ = reference_run(OPTIMIZERS["soap"], torch.float32, range(STEPS))
        result.update(_compare(single, reference))
    return result


def _after_load(mode, rank, out_dir):
    """Right after a load, before any step: consolidate_state_dict and a DCP re-save both work, and the
    re-saved checkpoint resumes bitwise."""
    def build():
        if mode == "fsdp":
            return _fsdp("soap")
        model = nn.parallel.DistributedDataParallel(Net())
        return model, OPTIMIZERS["soap"](model.parameters(), process_group=torch.distributed.group.WORLD)

    model, opt = build()
    _train(model, opt, range(4), rank)
    first, second = os.path.join(out_dir, f"first-{mode}"), os.path.join(out_dir, f"second-{mode}")
    dcp_save(model, opt, first)

    loaded_model, loaded_opt = build()
    dcp_load(loaded_model, loaded_opt, first)
    consolidated = loaded_opt.consolidate_state_dict(to=0)
    dcp_save(loaded_model, loaded_opt, second)

    resumed, resumed_opt = build()
    dcp_load(resumed, resumed_opt, second)
    _train(resumed, resumed_opt, range(4, STEPS), rank)
    reference, reference_opt = reference_run(OPTIMIZERS["soap"], torch.float32, range(STEPS))
    result = _compare(resumed.module if mode == "ddp" else resumed, reference)
    if rank == 0:
        _, at_four = reference_run(OPTIMIZERS["soap"], torch.float32, range(4))
        result["consolidated_complete"] = _same(at_four.state_dict()["state"], consolidated["state"])
    return result


def _share_is_not_whole(rank, out_dir):
    """Under FSDP2 a plain state_dict() is this rank's share: it loads back on the same rank, and a
    one-process optimizer (or the other rank) refuses it, naming what it is."""
    model, opt = _fsdp("soap")
    _train(model, opt, range(3), rank)
    share = opt.state_dict()
    marker = share["soap_optim_share"]
    other = {**share, "soap_optim_share": {**marker, "rank": 1 - rank}}  # as the other rank's file says
    single_opt = OPTIMIZERS["soap"](Net().parameters())
    return {
        "own": _refusal(lambda: opt.load_state_dict(share)),
        "other_rank": _refusal(lambda: opt.load_state_dict(other)),
        "one_process": _refusal(lambda: single_opt.load_state_dict(share)),
    }


def _whole_mesh_lightning(rank, out_dir):
    """Lightning's ModelParallelStrategy mesh (data_parallel=2, tensor_parallel=1) passed whole to
    fully_shard: trains bitwise like one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = Net()
    fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS["soap"](model.parameters())
    _train(model, opt, range(STEPS), rank)
    reference, _ = reference_run(OPTIMIZERS["soap"], torch.float32, range(STEPS))
    return _compare(model, reference)


def _accelerate(rank, out_dir):
    """accelerate's own ``Accelerator.prepare`` with an FSDP2 plugin (what HF Trainer calls for FSDP).
    On a machine without an accelerator it silently falls back to DDP (MULTI_CPU), so its shared state is
    set to FSDP after set-up, as the DESIGN notes say; its FSDP2 code then runs unchanged on the CPU."""
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    except ImportError:
        return {"skipped": "accelerate is not installed"}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    results = {}
    for name in ("soap", "shampoo", "torch-adamw"):
        AcceleratorState._reset_state(reset_partial_state=True)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        for shared in (AcceleratorState._shared_state, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        model = Net()
        model, opt = accelerator.prepare(model, OPTIMIZERS[name](model.parameters()))
        for step in range(STEPS):
            opt.zero_grad()
            accelerator.backward(loss_of(model, *half_batch(step, torch.float32, rank)))
            opt.step()
        reference, _ = reference_run(OPTIMIZERS[name], torch.float32, range(STEPS))
        results[name] = {
            "sharded": all(hasattr(p, "device_mesh") for p in model.parameters()),
            **_compare(model, reference),
        }
    AcceleratorState._reset_state(reset_partial_state=True)
    return results


def _dcp_save(rank, out_dir):
    """Save at 2 ranks (FSDP2, SOAP after 4 steps): the checkpoint, and the whole state to compare with."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, opt = _fsdp("soap")
    _train(model, opt, range(4), rank)
    dcp_save(model, opt, os.path.join(out_dir, "saved-at-2"))
    whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    params = [_whole(p) for p in model.parameters()]  # a collective: every rank
    if rank == 0:
        torch.save({"state": copy.deepcopy(whole["state"]), "params": params}, os.path.join(out_dir, "saved-at-2.pt"))
    return {}


def _dcp_load_at_3(rank, out_dir):
    """Load the 2-rank checkpoint at 3 ranks (7-row matrices split 3/3/1): the whole state and parameters
    are the saved ones bit for bit, and training continues."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, opt = _fsdp("soap")
    dcp_load(model, opt, os.path.join(out_dir, "saved-at-2"))
    saved = torch.load(os.path.join(out_dir, "saved-at-2.pt"), weights_only=False)
    whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    same_state = _same(saved["state"], whole["state"])  # before training on: the step counts are live tensors
    same_params = all(torch.equal(a, b) for a, b in zip(saved["params"], [_whole(p) for p in model.parameters()]))
    for step in range(4, STEPS):  # and it trains on
        opt.zero_grad()
        loss_of(model, *half_batch(step, torch.float32, 0)).backward()
        opt.step()
    return {"state": same_state, "params": same_params}


SCENARIOS = {f"swap-{name}": functools.partial(_swap, name) for name in OPTIMIZERS}
SCENARIOS["fsdp1"] = _fsdp1
SCENARIOS["deepspeed-flat"] = _deepspeed_flat
# with cpu_offload only rank 0 holds the result, so it loads back with broadcast_from_rank0
FULL = [(False, False), (False, True), (True, True)]
SCENARIOS.update({f"full-{o}-{b}": functools.partial(_full_state_dict, o, b) for o, b in FULL})
SCENARIOS["ddp-rank0-save"] = _ddp_rank0_save
SCENARIOS.update({f"after-load-{m}": functools.partial(_after_load, m) for m in ("fsdp", "ddp")})
SCENARIOS["share"] = _share_is_not_whole
SCENARIOS["lightning-mesh"] = _whole_mesh_lightning
SCENARIOS["accelerate"] = _accelerate  # last: it changes accelerate's process-wide state
RESHARD = {"dcp-save-2": _dcp_save, "dcp-load-3": _dcp_load_at_3}  # their own jobs (2 ranks, then 3)
SCENARIOS.update(RESHARD)


@pytest.fixture(scope="module")
def job():
    return run_job(__name__.split(".")[-1], [name for name in SCENARIOS if name not in RESHARD])


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """The 2-rank save, then the 3-rank load, in one directory; and the load at one process, here."""
    directory = str(tmp_path_factory.mktemp("reshard"))
    saved = run_job(__name__.split(".")[-1], ["dcp-save-2"], out_dir=directory)
    loaded = run_job(__name__.split(".")[-1], ["dcp-load-3"], world_size=3, out_dir=directory)
    model = Net()
    opt = OPTIMIZERS["soap"](model.parameters())
    dcp_load(model, opt, os.path.join(directory, "saved-at-2"), no_dist=True)
    reference = torch.load(os.path.join(directory, "saved-at-2.pt"), weights_only=False)
    names = dict(zip(map(id, model.parameters()), (n for n, _ in model.named_parameters())))
    one = {
        "state": _same(reference["state"], {names[id(p)]: opt.state[p] for p in model.parameters()}),
        "params": all(torch.equal(a, b.detach()) for a, b in zip(reference["params"], model.parameters())),
    }
    return saved, loaded, one


def _records(job, name):
    for rank, record in enumerate(job[name]):
        assert record["ok"], f"rank {rank} failed:\n{record.get('error')}"
    return [record["checks"] for record in job[name]]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameters_swapped_in_after_construction_train_bitwise(job, name):
    for rank, check in enumerate(_records(job, f"swap-{name}")):
        assert check["bitwise"], (rank, check["max_diff"])


def test_fsdp1_flat_parameters_are_refused_by_shape_dependent_optimizers(job):
    for messages in _records(job, "fsdp1"):
        for orig in (True, False):
            for name in ("soap", "shampoo", "adafactor"):
                message = messages[f"{name}-{orig}"]
                assert message and "FSDP1" in message and "fully_shard" in message, (name, orig, message)
            assert messages[f"adamw-{orig}"] is None


def test_deepspeed_style_flat_partition_is_refused_before_anything_changes(job):
    for check in _records(job, "deepspeed-flat"):
        assert check["message"] and "flat 1-D" in check["message"] and "DeepSpeed" in check["message"]
        assert check["unchanged"] and check["state"] == 0


@pytest.mark.parametrize("offload,broadcast", FULL, ids=[f"offload={o}-broadcast={b}" for o, b in FULL])
def test_full_state_dict_is_complete_and_resumes_bitwise(job, offload, broadcast):
    for rank, check in enumerate(_records(job, f"full-{offload}-{broadcast}")):
        if rank == 0 or not offload:
            assert check["complete"], rank
        assert check["bitwise"], (rank, check["max_diff"])


def test_sharded_ddp_rank0_state_dict_refuses_then_consolidates(job):
    records = _records(job, "ddp-rank0-save")
    assert records[0]["refused"] and "consolidate_state_dict(to=0)" in records[0]["refused"]
    assert records[0]["bitwise"], records[0]["max_diff"]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_consolidate_and_dcp_resave_right_after_a_load(job, mode):
    records = _records(job, f"after-load-{mode}")
    for rank, check in enumerate(records):
        assert check["bitwise"], (rank, check["max_diff"])
    assert records[0]["consolidated_complete"]


def test_a_share_never_loads_as_a_whole(job):
    for check in _records(job, "share"):
        assert check["own"] is None
        assert "share" in check["other_rank"] and "consolidate_state_dict" in check["other_rank"]
        assert "share" in check["one_process"] and "one process" in check["one_process"]


def test_lightning_whole_two_d_mesh_trains_bitwise(job):
    for rank, check in enumerate(_records(job, "lightning-mesh")):
        assert check["bitwise"], (rank, check["max_diff"])


def test_accelerate_prepare_with_fsdp2_trains_bitwise(job):
    records = _records(job, "accelerate")
    if "skipped" in records[0]:
        pytest.skip(records[0]["skipped"])
    for rank, check in enumerate(records):
        for name, result in check.items():
            assert result["sharded"], (rank, name)
            assert result["bitwise"], (rank, name, result["max_diff"])


def test_dcp_saved_at_two_ranks_loads_at_three_and_at_one(resharded):
    saved, loaded, one = resharded
    for record in saved["dcp-save-2"]:
        assert record["ok"], record.get("error")
    for rank, record in enumerate(loaded["dcp-load-3"]):
        assert record["ok"], (rank, record.get("error"))
        assert record["checks"]["state"] and record["checks"]["params"], rank
    assert one["state"] and one["params"]
