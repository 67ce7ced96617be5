"""SOAP's steps are whole or not at all without a backup copy (soap_optim.pending_writes).

Its math computes every new value before it writes anything and hands the writes to the base, which
applies them once every group's math has run; so an out-of-memory error at any allocation of a step
leaves parameters and state bit for bit as they were, and the base takes no transient copy of them
(for a 12.9M-parameter GPT that copy was +534 MB of peak memory, benchmarks/bucket_memory.py --gpt).
A basis refresh comes after the writes: one that fails keeps its bases and moments and the step is taken.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import soap_optim.optimizer as base
from registry import assert_bitwise_equal, optimizer_snapshot
from soap_optim import SOAP


class _OutOfMemory(RuntimeError):
    pass


def _allocates(func) -> bool:
    """Whether an aten op returns a new tensor (writes into none of its arguments)."""
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return any(r.alias_info is None and str(r.type) in ("Tensor", "Tensor[]", "List[Tensor]") for r in schema.returns)


class _FailAt(TorchDispatchMode):
    """Raises an out-of-memory error at the ``n``-th op that allocates a tensor (never, for n = 0), and
    counts them."""

    def __init__(self, n: int = 0):
        super().__init__()
        self.n, self.count = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _allocates(func):
            self.count += 1
            if self.count == self.n:
                raise _OutOfMemory(f"out of memory (injected at allocation {self.n}: {func})")
        return func(*args, **(kwargs or {}))


def _fail_at_every_allocation(opt, params, count, before, state_before):
    """Fail the step at its 1st, 2nd, ... allocation; after each failure nothing has changed. Bookkeeping
    the step caches before its math (per-parameter limits, kept while the groups do not change) is not
    allocated again by the next attempt, so the last attempts may run out of allocations to fail at: the
    first that does not raise is the step itself, and the caller compares it with a never-failed run."""
    failed = 0
    for n in range(1, count + 1):
        try:
            with _FailAt(n):
                opt.step()
        except _OutOfMemory:
            failed += 1
            assert_bitwise_equal([p.detach() for p in params], before)
            assert_bitwise_equal(optimizer_snapshot(opt), state_before)
            continue
        break
    else:
        opt.step()
    assert failed >= count - 4, (failed, count)


SHAPES = [(5, 4), (5, 4), (4,), (3, 2, 2), (6, 3)]

CONFIGS = {
    "default": {},
    "one-at-a-time": {"foreach": False},
    "factorized": {"factorized": True, "normalize_grads": True},
    "merged-1d": {"merge_dims": True, "precondition_1d": True, "max_precond_dim": 5},
    "tolerance-decay": {"refresh_tolerance": 0.05, "weight_decay": 0.1},
    "kl": {"factor_update": "kl"},
    "newton-schulz": {"newton_schulz": True},
    "newton-schulz-one-at-a-time": {"newton_schulz": True, "foreach": False},
}


def _model(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _trained(options, steps, dtype=torch.float32, rollback_on_error=True):
    params = _model(dtype=dtype)
    # two groups, so that a failure in the second group's math comes after the first group's math ran
    groups = [{"params": params[:3]}, {"params": params[3:]}]
    for group in groups:
        group["rollback_on_error"] = rollback_on_error
    opt = SOAP(groups, precondition_frequency=3, **options)
    for step in range(steps):
        _grads(params, step)
        opt.step()
    return opt, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_out_of_memory_at_any_allocation_changes_nothing(config, dtype):
    """For every allocation of a step (counted over all aten ops): an out-of-memory error there raises and
    leaves parameters and state bit for bit as they were, even with the backup copy turned off
    (``rollback_on_error=False``); then the same step without the error gives the bits of a run that
    never failed."""
    options = CONFIGS[config]
    opt, params = _trained(options, 4, dtype, rollback_on_error=False)  # counters at 3: step 4 does not refresh
    control, control_params = _trained(options, 4, dtype)
    _grads(params, 99)
    _grads(control_params, 99)
    counter = _FailAt()
    with counter:
        control.step()
    assert counter.count > 30  # the step's math, not only the checks before it
    before, state_before = [p.detach().clone() for p in params], optimizer_snapshot(opt)
    _fail_at_every_allocation(opt, params, counter.count, before, state_before)
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in control_params])
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))


def _without_eigenvalues(opt):
    """Load ``opt``'s own checkpoint with the KL eigenvalues taken out: one saved before they existed."""
    state_dict = copy.deepcopy(opt.state_dict())
    for entry in state_dict["state"].values():
        entry.pop("eigenvalues")
    opt.load_state_dict(state_dict)


def _switched_to_gram(opt):
    for group in opt.param_groups:
        group["factor_update"] = "gram"


@pytest.mark.parametrize("change", [_without_eigenvalues, _switched_to_gram], ids=["old-checkpoint", "to-gram"])
@pytest.mark.parametrize("foreach", [None, False], ids=["batched", "one-at-a-time"])
def test_out_of_memory_leaves_the_eigenvalues_entry_as_it_was(change, foreach):
    """A KL state without ``eigenvalues`` (a checkpoint from before them) gets them estimated by its next
    step, and a group switched to Gram factors drops them: both with the step's writes, so that a step
    that fails at any allocation leaves every state's entries as they were; the step then taken gives a
    never-failed run's bits."""
    options = dict(CONFIGS["kl"], foreach=foreach)
    opt, params = _trained(options, 4, rollback_on_error=False)
    control, control_params = _trained(options, 4)
    for optimizer in (opt, control):
        change(optimizer)
    _grads(params, 99)
    _grads(control_params, 99)
    counter = _FailAt()
    with counter:
        control.step()
    assert counter.count > 30
    before, state_before = [p.detach().clone() for p in params], optimizer_snapshot(opt)
    assert any(("eigenvalues" in state) != (change is _without_eigenvalues) for state in state_before)
    _fail_at_every_allocation(opt, params, counter.count, before, state_before)
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in control_params])
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))
    assert all(("eigenvalues" in state) == (change is _without_eigenvalues) for state in optimizer_snapshot(opt))


@pytest.mark.parametrize("config", ["default", "one-at-a-time", "newton-schulz"])
def test_no_backup_copy_for_soaps_pytorch_paths(config, monkeypatch):
    """The base copies nothing before SOAP's math (it copied every stepped parameter and its whole state);
    parameters on one storage, stepped one after the other in place, still get the copy."""
    copied = []
    original = base._copy_all
    monkeypatch.setattr(base, "_copy_all", lambda states, params: copied.append((len(states), len(params))) or original(states, params))
    opt, params = _trained(CONFIGS[config], 5)
    assert copied and set(copied) == {(0, 0)}
    shared = nn.Parameter(params[0].detach())  # a second Parameter on the first one's storage
    opt.add_param_group({"params": [shared]})
    copied.clear()
    _grads(params + [shared], 7)
    opt.step()
    assert max(n for _, n in copied) > 0


@pytest.mark.parametrize("config", ["default", "one-at-a-time", "factorized", "kl", "newton-schulz"])
def test_a_failed_refresh_keeps_its_bases_and_the_step_is_taken(config, monkeypatch):
    """An error inside a basis refresh (here while the first moment is carried to the new bases, after the
    QR) is reported by a warning; the step is taken, and every refresh unit keeps the bases and moments it
    would have replaced: bit for bit a run in which that refresh was not due."""
    options = CONFIGS[config]
    opt, params = _trained(options, 4)  # counters at 3: the next step (4)... not due with frequency 3
    control, control_params = _trained(options, 4)
    for group in opt.param_groups + control.param_groups:
        group["precondition_frequency"] = 2  # ...but due with 2
    for group in control.param_groups:
        group["precondition_frequency"] = 1000  # the control skips this refresh
    _grads(params, 50)
    _grads(control_params, 50)
    control.step()
    with monkeypatch.context() as patch:
        patch.setattr("soap_optim.eigenbasis.moments.project", lambda *a, **k: (_ for _ in ()).throw(_OutOfMemory("injected")))
        with pytest.warns(RuntimeWarning, match="basis refresh failed"):
            opt.step()
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in control_params])
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))
    # and the next due refresh runs in both
    for group in control.param_groups:
        group["precondition_frequency"] = 2
    for step in range(51, 54):
        _grads(params, step)
        _grads(control_params, step)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        control.step()
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in control_params])



@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single-tensor"])
def test_elementwise_groups_written_in_place_are_undone_when_a_later_group_fails(foreach):
    """Adam's math writes each group in place once it has allocated everything, so it needs no copy of its
    own; but a failure in a later group's math comes after those writes. An out-of-memory error at every
    allocation of a two-group AdamW step in turn: parameters and state stay bit for bit as they were
    (default rollback_on_error), and the step then gives a never-failed run's bits."""
    from soap_optim import AdamW

    def trained():
        params = _model()
        opt = AdamW([{"params": params[:3]}, {"params": params[3:]}], lr=0.1, foreach=foreach)
        for step in range(3):
            _grads(params, step)
            opt.step()
        _grads(params, 99)
        return opt, params

    opt, params = trained()
    control, control_params = trained()
    counter = _FailAt()
    with counter:
        control.step()
    assert counter.count > 4
    before, state_before = [p.detach().clone() for p in params], optimizer_snapshot(opt)
    _fail_at_every_allocation(opt, params, counter.count, before, state_before)
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in control_params])
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))
