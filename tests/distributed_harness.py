"""Spawning a 2-rank gloo job for the distributed tests, and the one-process reference they compare with.

One job per test module: every scenario of the module runs inside the same process group (a job costs
seconds to start), each rank writes one JSON record per scenario, and the tests read them. Rendezvous is
a ``file://`` store in a temporary directory; the process group has a timeout, and the whole job one
more, so that a hang fails instead of stalling CI.

The reference (tests/../shared DESIGN): one process runs each rank's half batch as its own micro-batch,
scales each loss by 1/2 and accumulates. Scaling by 2^-1 is exact and a sum of two operands has no order,
so these gradients equal DDP's all-reduce average and FSDP2's reduce-scatter average bit for bit;
torch.optim.AdamW through the same harness is the control that proves it.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import soap_optim

WORLD_SIZE = 2

# The optimizers every distributed test module compares with one process (a subset where it says so);
# ``torch.optim.AdamW`` is the control. Refreshes at steps 3 and 6 (precondition_frequency=3).
def _soap_with_unpreconditioned_group(params, **kw):
    """Every third parameter (gate.weight: fc1's twin, a 7 x 7 block, the 3-D weight among them) in a group
    with max_precond_dim=0, as ``soap_optim.hidden_groups`` puts embeddings: same shapes in two groups."""
    params = list(params)
    plain = [p for i, p in enumerate(params) if i % 3 == 1]
    rest = [p for i, p in enumerate(params) if i % 3 != 1]
    return soap_optim.SOAP([{"params": rest}, {"params": plain, "max_precond_dim": 0}], lr=1e-2,
                           precondition_frequency=3, **kw)


OPTIMIZERS = {
    "torch-adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-2),
    "soap": lambda params, **kw: soap_optim.SOAP(params, lr=1e-2, precondition_frequency=3, **kw),
    "soap-merge-1d": lambda params, **kw: soap_optim.SOAP(
        params, lr=1e-2, precondition_frequency=3, merge_dims=True, precondition_1d=True, max_precond_dim=16, **kw
    ),
    "soap-one-sided": lambda params, **kw: soap_optim.SOAP(params, lr=1e-2, precondition_frequency=3, one_sided=True, **kw),
    "soap-factorized": lambda params, **kw: soap_optim.SOAP(params, lr=1e-2, precondition_frequency=3, factorized=True, **kw),
    "soap-normalize": lambda params, **kw: soap_optim.SOAP(
        params, lr=1e-2, precondition_frequency=3, normalize_grads=True, orthograd=True, **kw
    ),
    "soap-unpreconditioned-group": lambda params, **kw: _soap_with_unpreconditioned_group(params, **kw),
    "soap-newton-schulz": lambda params, **kw: soap_optim.SOAP(
        params, lr=1e-2, precondition_frequency=3, newton_schulz=True, **kw
    ),
    "shampoo": lambda params, **kw: soap_optim.Shampoo(
        params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2, **kw
    ),
    "adam": lambda params, **kw: soap_optim.Adam(params, lr=1e-2, weight_decay=0.1, **kw),
    "adamw": lambda params, **kw: soap_optim.AdamW(params, lr=1e-2, **kw),
    "adafactor": lambda params, **kw: soap_optim.Adafactor(params, lr=1e-2, beta1=0.9, **kw),
}
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
JOB_TIMEOUT_S = 600
GLOBAL_BATCH = 8


class Net(nn.Module):
    """A conv weight (4-D, merged under merge_dims), matrices whose dim 0 does not split evenly (7 and 5
    rows over 2 ranks), same-shaped matrices (fc1 and gate, the two costliest, which the owners split,
    so the batched products run on other batch sizes than in one process; three 7 x 7 blocks), a 3-D weight, biases and a LayerNorm's 1-D gains."""

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(36, 7)
        self.gate = nn.Linear(36, 7)
        self.norm = nn.LayerNorm(7)
        self.blocks = nn.ModuleList(nn.Linear(7, 7) for _ in range(3))
        self.fc2 = nn.Linear(7, 5)
        self.mix = nn.Parameter(torch.randn(6, 6, 2) / 6)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(self.conv(x)).flatten(1)
        mixed = torch.einsum("bij,ijk->bk", features.reshape(-1, 6, 6), self.mix)
        hidden = torch.tanh(self.norm(self.fc1(features))) * torch.sigmoid(self.gate(features))
        for block in self.blocks:
            hidden = hidden + torch.tanh(block(hidden))
        return torch.cat([self.fc2(hidden), mixed], dim=1)


def batch(step: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 7, generator=gen)
    return x.to(dtype), y.to(dtype)


def half_batch(step: int, dtype: torch.dtype, rank: int):
    x, y = batch(step, dtype)
    half = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def reference_gradients(model: nn.Module, step: int, dtype: torch.dtype) -> None:
    """One process: each rank's half batch as a micro-batch, loss / 2, accumulated."""
    for rank in range(WORLD_SIZE):
        x, y = half_batch(step, dtype, rank)
        (loss_of(model, x, y) / WORLD_SIZE).backward()


def reference_run(make_optimizer: Callable, dtype: torch.dtype, steps: range, model=None, opt=None):
    """(model, optimizer) after the one-process steps ``steps`` (fresh ones unless given)."""
    model = model if model is not None else Net(dtype)
    opt = opt if opt is not None else make_optimizer(model.parameters())
    for step in steps:
        opt.zero_grad()
        reference_gradients(model, step, dtype)
        opt.step()
    return model, opt


def _worker(rank: int, init_file: str, out_dir: str, module: str, names: List[str], world_size: int = WORLD_SIZE) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    import importlib

    import torch.distributed as dist

    # this rank's stderr, C++ included (gloo aborts, crashes), to a file the parent reports on failure
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT
    )
    scenarios = importlib.import_module(module).SCENARIOS
    records: Dict[str, Dict] = {}
    for name in names:
        try:
            records[name] = {"ok": True, "checks": scenarios[name](rank, out_dir)}
        except Exception:
            records[name] = {"ok": False, "error": traceback.format_exc()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
        dist.barrier()
    dist.destroy_process_group()


def run_job(module: str, names: List[str], world_size: int = WORLD_SIZE, out_dir: str = None) -> Dict[str, List[Dict]]:
    """Run scenarios ``names`` of ``module`` (its ``SCENARIOS`` dict) on ``world_size`` ranks; per name,
    each rank's record. Scenarios get ``out_dir`` (a new temporary directory unless given) for files.

    A rank that dies without a record (a process crash, not a failed check: those are records) fails
    its scenarios with the end of its stderr. Such a job is run once more, saying so on stderr with the
    dead ranks' logs: on a loaded 2-core machine a 4-rank gloo job once lost three ranks without a trace
    (not reproduced in repeated runs); a second crash fails the tests."""
    results, crashed = _run_once(module, names, world_size, out_dir)
    if crashed:
        print(f"distributed_harness: ranks {sorted(crashed)} of a {world_size}-rank job of {module} died without "
              f"a record; running the job once more. Their logs:\n{crashed}", file=sys.stderr)
        results, crashed = _run_once(module, names, world_size, out_dir)
    return results


def _run_once(module, names, world_size, out_dir):
    import torch.multiprocessing as mp

    out_dir = out_dir or tempfile.mkdtemp(prefix="soap_dist_")
    for stale in ("rendezvous",) + tuple(f"rank{r}.json" for r in range(world_size)):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    init_file = os.path.join(out_dir, "rendezvous")
    context = mp.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(r, init_file, out_dir, module, names, world_size)) for r in range(world_size)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOB_TIMEOUT_S)
    hung = [w for w in workers if w.is_alive()]
    for worker in hung:
        worker.kill()
    records = []
    for rank in range(world_size):
        path = Path(out_dir, f"rank{rank}.json")
        records.append(json.loads(path.read_text()) if path.exists() else {})
    if hung:
        raise RuntimeError(f"distributed job hung past {JOB_TIMEOUT_S} s; records so far: {records}")
    crashed = {}
    for rank in range(world_size):
        if any(name not in records[rank] for name in names):
            log = Path(out_dir, f"rank{rank}.log")
            crashed[rank] = log.read_text()[-3000:] if log.exists() else "(no log)"
    results = {
        name: [records[r].get(name, {"ok": False, "error": f"no record: the rank died; its stderr ends:\n{crashed.get(r)}"})
               for r in range(world_size)]
        for name in names
    }
    return results, crashed


class Replay:
    """The one-process reference for runs whose gradients no micro-batch split reproduces bit for bit
    (4 ranks, tensor parallelism): a plain copy of the model's parameters and an optimizer over them, fed
    each step the distributed run's own gradients, gathered whole. Parameters are compared whole."""

    def __init__(self, params, make_optimizer) -> None:
        self.params = [nn.Parameter(_whole(p).clone()) for p in params]
        self.optimizer = make_optimizer(self.params)

    def step(self, params) -> None:
        for mine, theirs in zip(self.params, params):
            mine.grad = None if theirs.grad is None else _whole(theirs.grad).clone()
        self.optimizer.step()

    def compare(self, params) -> dict:
        ours = [_whole(p) for p in params]
        return {
            "bitwise": all(torch.equal(a, b.detach()) for a, b in zip(ours, self.params)),
            "max_diff": max(float((a.double() - b.detach().double()).abs().max()) for a, b in zip(ours, self.params)),
        }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach()


def dcp_save(model, opt, path: str) -> None:
    """Model and optimizer through torch.distributed.checkpoint's state-dict API, as users save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)


def dcp_load(model, opt, path: str, **load_kwargs) -> None:
    """Load what :func:`dcp_save` wrote into ``model`` and ``opt`` (templates from the state-dict API)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=path, **load_kwargs)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
