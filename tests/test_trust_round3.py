"""Hostile and unusual inputs, round 3: each test pins one promise of the README or one torch.optim
convention that a new user relies on (torch.optim.AdamW / Adafactor behave so, or do better).

* bucket membership that changes every step (mixture-of-experts routing, frozen layers) keeps no buffer
  alive for rows nobody uses: held storage and a saved state dict stay at the state's own size;
* the optimizer's private records follow ``self.state`` and ``param_groups`` (state reset, pop, model
  surgery, removed parameters), and travel with copies of the optimizer (deepcopy, pickle, torch.save);
* an exception inside the math (out of memory included) leaves parameters and state as they were;
* step counters stay exact past 2^24, so refresh schedules keep running;
* hyperparameter types: what torch.optim takes (one-element tensor lr and betas, lists) steps exactly as
  the equal floats; anything else (numpy float32) is a ValueError naming it, before any step; a loaded
  tensor ``step`` is checked like a number;
* gradients whose squares overflow are refused (or skipped) before anything is modified, Adafactor's
  steps stay bounded, and no sequence of huge gradients makes a parameter infinite;
* Adafactor's ``eps`` must stay positive in the state's dtype;
* ``AdamW(foreach=False)`` is bitwise torch.optim.AdamW's.
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import soap_optim
from registry import OPTIMIZERS, SOAP_PATHS, assert_bitwise_equal, entry_params, iter_state_tensors, optimizer_snapshot
from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo

F32_MAX = torch.finfo(torch.float32).max


def _params(shapes=((5, 4), (4,)), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


def _train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        _grads(params, step)
        opt.step()


def _values(params):
    return [p.detach().clone() for p in params]


# ----------------------------------------------------------------------------- 1. bucket memory
def _held_and_own_bytes(opt):
    own, held = 0, {}
    for state in opt.state.values():
        for tensor in iter_state_tensors(state):
            own += tensor.numel() * tensor.element_size()
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(held.values()), own


def _saved_size(state_dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


def _compact(state_dict):
    """The same state dict with every tensor in storage of its own (what foreach=False holds)."""
    return {"state": copy.deepcopy({k: {n: _clone(v) for n, v in s.items()} for k, s in state_dict["state"].items()}),
            "param_groups": state_dict["param_groups"]}


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


@pytest.mark.parametrize("pattern", ["experts", "frozen"])
def test_changing_bucket_membership_holds_no_dead_rows(pattern):
    """16 same-shaped expert matrices plus 16 biases on SOAP's batched path. "experts": each has a gradient
    on a random half of the steps; "frozen": all train for 3 steps, then half of them stop for good. Held
    storage stays the state's own bytes after every step (it reached 4x before the fix), and a saved state
    dict is no larger than the same state with every tensor compacted."""
    if "batched" not in SOAP_PATHS:
        pytest.skip("the batched path needs soap_optim.kernels")
    params = _params([(12, 12)] * 16 + [(12,)] * 16)
    opt = SOAP(params, lr=1e-3, precondition_frequency=3, foreach=True, fused=False)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(12):
        if pattern == "experts":
            active = (torch.rand(16, generator=gen) < 0.5).tolist()
        else:
            active = [step < 3 or i % 2 == 0 for i in range(16)]
        active[step % 16] = True
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen) if active[i % 16] else None
        opt.step()
        held, own = _held_and_own_bytes(opt)
        worst = max(worst, held / own)
    assert worst <= 1.0 + 1e-9, worst
    state_dict = opt.state_dict()
    assert _saved_size(state_dict) <= 1.02 * _saved_size(_compact(state_dict))


def test_idle_rows_keep_their_values_and_the_run_matches_one_at_a_time():
    """Releasing idle rows copies them: values unchanged, and the batched run with random participation
    stays within the batched-vs-single rounding of foreach=False (same bound as test_batched_path)."""
    if "batched" not in SOAP_PATHS:
        pytest.skip("the batched path needs soap_optim.kernels")
    runs = []
    for foreach in (True, False):
        params = _params([(6, 6)] * 6, seed=1)
        opt = SOAP(params, lr=1e-2, precondition_frequency=2, foreach=foreach, fused=False)
        gen = torch.Generator().manual_seed(3)
        for step in range(10):
            active = (torch.rand(6, generator=gen) < 0.5).tolist()
            active[step % 6] = True
            grads = [torch.randn(6, 6, generator=gen) for _ in params]
            for p, g, a in zip(params, grads, active):
                p.grad = g if a else None
            opt.step()
        runs.append((params, opt))
    (a, _), (b, _) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 2 and 7. records follow the state
@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_state_reset_and_surgery_rebuild_the_state(entry):
    """``opt.state.pop(p)`` after resizing ``p``, and ``opt.state = defaultdict(dict)`` with a new
    ``state_dtype``: the state is rebuilt from nothing, as torch.optim does, exactly as a fresh optimizer
    builds it."""
    params = _params()
    opt = entry.make(params)
    _train(opt, params, entry.warmup_steps + 2)
    with torch.no_grad():
        params[0].data = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    opt.state.pop(params[0])
    fresh_params = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = entry.make(fresh_params)
    _grads(params, 50)
    _grads(fresh_params, 50)
    opt.step()
    fresh.step()
    assert_bitwise_equal(params[0].detach(), fresh_params[0].detach())
    assert_bitwise_equal(optimizer_snapshot(opt)[0], optimizer_snapshot(fresh)[0])

    opt.state = defaultdict(dict)
    opt.param_groups[0]["state_dtype"] = torch.float64
    _train(opt, params, 2, start=60)
    assert all(t.dtype == torch.float64 for t in iter_state_tensors(opt.state[params[0]]) if t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_a_removed_parameter_is_freed(entry):
    params = _params([(5, 4), (5, 4), (4,)])
    opt = entry.make(params)
    _train(opt, params, entry.warmup_steps + 2)
    removed = weakref.ref(params[0])
    opt.param_groups[0]["params"].remove(params[0])
    opt.state.pop(params[0])
    del params[0]
    _train(opt, params, 1, start=10)
    gc.collect()
    assert removed() is None


def test_removing_every_matrix_is_surgery_not_a_flat_swap():
    """Only the 1-D tensors left in a group after the user removed its matrices: trained on, not refused
    as the flat partitions DeepSpeed or FSDP1 put in (those are tensors the group was not given)."""
    params = _params([(5, 4), (4,)])
    opt = SOAP(params)
    _train(opt, params, 2)
    opt.param_groups[0]["params"].remove(params[0])
    opt.state.pop(params[0])
    bias = params[1]
    before = bias.detach().clone()
    _train(opt, [bias], 1, start=2)
    assert not torch.equal(bias.detach(), before)
    flat = torch.nn.Parameter(torch.randn(24))
    flat.grad = torch.ones(24)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="flat 1-D"):
        opt.step()


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_the_layout_guard(copier):
    """A copy of the optimizer refuses a layout change exactly as the original does (ValueError naming
    the option, nothing modified); the copy also steps on exactly as the original."""
    params = _params()
    opt = SOAP(params, foreach=False, precondition_frequency=2)
    _train(opt, params, 3)
    if copier == "deepcopy":
        twin = copy.deepcopy(opt)
    elif copier == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin_params = twin.param_groups[0]["params"]
    for key, value in (("max_precond_dim", 4), ("state_dtype", torch.float64), ("merge_dims", True)):
        saved = twin.param_groups[0][key]
        twin.param_groups[0][key] = value
        _grads(twin_params, 9)
        before = optimizer_snapshot(twin)
        with pytest.raises(ValueError, match=f"built with {key}="):
            twin.step()
        assert_bitwise_equal(optimizer_snapshot(twin), before)
        twin.param_groups[0][key] = saved
    _train(twin, twin_params, 3, start=20)
    _train(opt, params, 3, start=20)
    assert_bitwise_equal(_values(twin_params), _values(params))


# ----------------------------------------------------------------------------- 3. exceptions inside the math
class _OutOfMemory(RuntimeError):
    pass


def _boom(*args, **kwargs):
    raise _OutOfMemory("out of memory (injected)")


FIRST_STEP_FAILURES = [
    ("soap", lambda: SOAP, "soap_optim.soap.initial_basis"),
    ("shampoo", lambda: Shampoo, "soap_optim.shampoo.zero_factors"),
]


@pytest.mark.parametrize("name,cls,target", FIRST_STEP_FAILURES, ids=[f[0] for f in FIRST_STEP_FAILURES])
@pytest.mark.parametrize("foreach", [None, False])
def test_failure_while_building_the_state_leaves_no_half_state(name, cls, target, foreach, monkeypatch):
    """SOAP's first step allocates its factors and bases (its memory peak). An out-of-memory error there
    left a state without 'bases' (Shampoo: without 'factors'), and every later step raised KeyError."""
    cls = cls()
    kwargs = {"foreach": foreach} if cls is SOAP else {}
    params, control = _params(), _params()
    opt, control_opt = cls(params, **kwargs), cls(control, **kwargs)
    _grads(params, 0)
    with monkeypatch.context() as patch:
        patch.setattr(target, _boom)
        with pytest.raises(_OutOfMemory):
            opt.step()
    assert not any(opt.state.values())
    assert_bitwise_equal(_values(params), _values(control))
    _train(opt, params, 4)
    _train(control_opt, control, 4)
    assert_bitwise_equal(_values(params), _values(control))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control_opt))


LATER_FAILURES = [
    # SOAP computes everything before it writes (its factor EMA, an in-place product, is then applied):
    # its last fallible op is the parameters' new values (tests/test_held_writes.py tries every one)
    ("soap-single", lambda: SOAP(_p(), foreach=False), "soap_optim.soap.apply_update_"),
    ("soap-batched", lambda: SOAP(_p(), foreach=True, fused=False), "soap_optim.kernels.unrotate_apply_"),
    ("shampoo", lambda: Shampoo(_p(), start_preconditioning_step=1, precondition_frequency=1), "soap_optim.shampoo.inverse_root"),
    ("adafactor", lambda: Adafactor(_p(), beta1=0.9), "soap_optim.adafactor.clip_by_rms_"),
]


def _p():
    return _params([(5, 4), (5, 4), (4,)])


@pytest.mark.parametrize("name,make,target", LATER_FAILURES, ids=[f[0] for f in LATER_FAILURES])
def test_failure_late_in_a_step_changes_nothing(name, make, target, monkeypatch):
    """An exception after counters, moments and (some) parameters were already advanced: everything is
    put back, and the run then goes on bit for bit as one that never tried that step."""
    opt, control_opt = make(), make()
    params = [p for g in opt.param_groups for p in g["params"]]
    control = [p for g in control_opt.param_groups for p in g["params"]]
    _train(opt, params, 4)
    _train(control_opt, control, 4)
    before, state_before = _values(params), optimizer_snapshot(opt)
    _grads(params, 99)
    with monkeypatch.context() as patch:
        patch.setattr(target, _boom)
        with pytest.raises(_OutOfMemory):
            opt.step()
    assert_bitwise_equal(_values(params), before)
    assert_bitwise_equal(optimizer_snapshot(opt), state_before)
    _train(opt, params, 3, start=4)
    _train(control_opt, control, 3, start=4)
    assert_bitwise_equal(_values(params), _values(control))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control_opt))


@pytest.mark.parametrize("name,make,target", LATER_FAILURES[2:3], ids=[LATER_FAILURES[2][0]])
def test_rollback_on_error_false_keeps_no_copy(name, make, target, monkeypatch):
    """The opt-out: no transient copy is taken (the failed step is then not undone), while the default
    copies the stepped parameters and state once per step."""
    import soap_optim.optimizer as base

    copied = []
    original = base._copy_all
    monkeypatch.setattr(base, "_copy_all", lambda states, params: copied.append(len(params)) or original(states, params))
    opt = make()
    params = [p for g in opt.param_groups for p in g["params"]]
    _train(opt, params, 2)
    assert copied and max(copied) > 0
    copied.clear()
    for group in opt.param_groups:
        group["rollback_on_error"] = False
    _train(opt, params, 2, start=2)
    assert copied and max(copied) == 0
    with pytest.raises(ValueError, match="rollback_on_error"):
        opt.param_groups[0]["rollback_on_error"] = "yes"
        opt.step()


class _OpOrder(TorchDispatchMode):
    """Records, for every aten op, whether it writes into an existing tensor or allocates a new one."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        allocates = not writes and any(
            r.alias_info is None and str(r.type) in ("Tensor", "Tensor[]", "List[Tensor]") for r in schema.returns
        )
        self.events.append((str(func), writes, allocates))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: AdamW(p),
        lambda p: AdamW(p, foreach=False),
        lambda p: AdamW(p, amsgrad=True),
        lambda p: AdamW(p, foreach=False, amsgrad=True),
        lambda p: Adam(p, weight_decay=0.1, maximize=True),
        lambda p: Adam(p, weight_decay=0.1, maximize=True, foreach=False),
    ],
    ids=["adamw", "adamw-single", "adamw-amsgrad", "adamw-single-amsgrad", "adam-l2-maximize", "adam-l2-maximize-single"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_allocates_everything_before_it_modifies_anything(make, dtype):
    """Adam's PyTorch paths take no backup copy for "whole or not at all" (it would double the step's
    cost): instead no tensor is allocated once the first tensor was modified, so an out-of-memory error
    can only come before anything changed. Before, the denominators were allocated after counters and
    moments had advanced (and, one parameter at a time, after earlier parameters had moved)."""
    params = [p.to(dtype).detach().requires_grad_() for p in _params([(5, 4), (5, 4), (4,), (3, 2)])]
    opt = make(params)
    for step in range(3):
        _grads(params, step)
        recorder = _OpOrder()
        with recorder:
            opt.step()
        first_write = next(i for i, (_, writes, _) in enumerate(recorder.events) if writes)
        late = [name for name, _, allocates in recorder.events[first_write:] if allocates]
        assert not late, late


# ----------------------------------------------------------------------------- 5. step counters
def _set_steps(opt, count):
    for state in opt.state.values():
        state["step"].fill_(count)


def _counts_that_change(opt, param, key, start, steps=15):
    """Set every step counter to ``start``, take ``steps`` steps; the counts at which ``state[key]`` changed."""
    _set_steps(opt, start)
    changed = []
    for step in range(steps):
        before = [t.clone() for t in opt.state[param][key]]
        _grads([param], 10 + step)
        opt.step()
        if not all(torch.equal(b, n) for b, n in zip(before, opt.state[param][key])):
            changed.append(start + step + 1)
    assert int(opt.state[param]["step"].item()) == start + steps
    return changed


@pytest.mark.parametrize("path", list(SOAP_PATHS))
def test_soap_refreshes_past_two_to_the_24(path):
    """A float32 counter stops at 2^24 (2^24 + 1 rounds back): the refresh schedule froze. Counted exactly,
    a run from 2^24 - 2 with precondition_frequency=10 refreshes exactly at the counts divisible by 10."""
    params = _params([(4, 4)])
    opt = SOAP(params, precondition_frequency=10, **SOAP_PATHS[path])
    _train(opt, params, 3)
    start = 2**24 - 2
    refreshed = _counts_that_change(opt, params[0], "bases", start)
    assert refreshed == [c for c in range(start + 1, start + 16) if c % 10 == 0] == [2**24 + 4]
    # and the count survives a state dict round trip
    restored = SOAP(_params([(4, 4)]), precondition_frequency=10, **SOAP_PATHS[path])
    restored.load_state_dict(opt.state_dict())
    assert int(restored.state[restored.param_groups[0]["params"][0]]["step"].item()) == start + 15


def test_shampoo_recomputes_roots_past_two_to_the_24():
    params = _params([(4, 4)])
    opt = Shampoo(params, precondition_frequency=10, start_preconditioning_step=1)
    _train(opt, params, 3)
    assert _counts_that_change(opt, params[0], "roots", 2**24 - 2) == [2**24 + 5]  # (t - 1) % 10 == 0


@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_counts_are_exact_past_two_to_the_24_and_old_checkpoints_load(entry):
    params = _params()
    opt = entry.make(params)
    _train(opt, params, entry.warmup_steps + 1)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = torch.tensor(float(2**24), dtype=torch.float32)  # torch.optim's form
    opt.load_state_dict(saved)
    _train(opt, params, 3, start=5)
    counts = {int(s["step"].item()) for s in opt.state.values()}
    assert counts == {2**24 + 3}


# ----------------------------------------------------------------------------- 6, 12, 8. value types
@pytest.mark.parametrize("dims", [0, 1, 2])
@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_tensor_lr_of_any_one_element_shape(entry, dims):
    """torch's own test_tensor_lr: lr as a tensor of shape [], [1] or [1, 1] steps exactly as the float."""
    runs = []
    tensor_lr = torch.tensor(1e-3).reshape([1] * dims)  # float32: the equal float is tensor_lr.item()
    for lr in (tensor_lr.item(), tensor_lr):
        weight, bias = nn.Parameter(torch.randn(10, 5, generator=torch.Generator().manual_seed(0))), nn.Parameter(torch.zeros(10))
        opt = entry.make([weight, bias], lr=lr)
        x = torch.randn(5, generator=torch.Generator().manual_seed(1))
        for _ in range(entry.warmup_steps + 4):
            opt.zero_grad()
            (weight.mv(x) + bias).pow(2).sum().backward()
            opt.step()
        runs.append((weight, bias))
    assert_bitwise_equal(_values(runs[0]), _values(runs[1]))


BETAS_ENTRIES = [e for e in OPTIMIZERS if "betas" in e.hparams or e.name.startswith(("soap", "adam", "shampoo"))]


@pytest.mark.parametrize("form", ["list", "list-of-tensors", "tensor-shape-1"])
@pytest.mark.parametrize("entry", entry_params(BETAS_ENTRIES))
def test_betas_in_every_form_torch_takes_step_as_floats(entry, form):
    beta1, beta2 = entry.hparams.get("betas", (0.9, 0.99))
    given = {
        "list": [beta1, beta2],
        "list-of-tensors": [torch.tensor(beta1, dtype=torch.float64), torch.tensor(beta2, dtype=torch.float64)],
        "tensor-shape-1": (torch.tensor([beta1], dtype=torch.float64), torch.tensor([[beta2]], dtype=torch.float64)),
    }[form]
    a, b = _params(), _params()
    _train(entry.make(a, betas=(beta1, beta2)), a, entry.warmup_steps + 3)
    _train(entry.make(b, betas=given), b, entry.warmup_steps + 3)
    assert_bitwise_equal(_values(b), _values(a))


@pytest.mark.parametrize("entry", entry_params(BETAS_ENTRIES))
def test_numpy_float32_betas_are_refused_everywhere(entry):
    """torch.optim.AdamW refuses them too; before, they passed and every SOAP step then raised 'step_size
    must be a float' after counters and moments had changed."""
    bad = (np.float32(0.9), np.float32(0.95))
    with pytest.raises(ValueError, match=r"betas\[0\] must be a Python number .*numpy.float32"):
        entry.make(_params(), betas=bad)
    params = _params()
    opt = entry.make(params[:1])
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        opt.add_param_group({"params": params[1:], "betas": bad})
    assert len(opt.param_groups) == 1
    _train(opt, params[:1], entry.warmup_steps + 1)
    saved = opt.state_dict()
    saved["param_groups"][0]["betas"] = bad
    before = optimizer_snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0 of the loaded state dict: betas\[0\]"):
        opt.load_state_dict(saved)
    assert_bitwise_equal(optimizer_snapshot(opt), before)
    # numpy's float64 is a Python float: accepted, and steps as one
    entry.make(_params(), betas=(np.float64(0.9), np.float64(0.95)))


@pytest.mark.parametrize(
    "bad", [torch.tensor(float("nan")), torch.tensor(-1.0), torch.tensor([1.0, 2.0]), torch.tensor(2.5), torch.tensor(float("inf"))],
    ids=["nan", "negative", "shape-2", "fraction", "inf"],
)
@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_loaded_tensor_step_is_checked_like_a_number(entry, bad):
    params = _params()
    opt = entry.make(params)
    _train(opt, params, entry.warmup_steps + 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = bad
    before = optimizer_snapshot(opt)
    with pytest.raises(ValueError, match="invalid step count"):
        opt.load_state_dict(saved)
    assert_bitwise_equal(optimizer_snapshot(opt), before)


# ----------------------------------------------------------------------------- 4 and 9. huge gradients
@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30, 1e38])
@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_huge_gradients_are_refused_or_take_bounded_steps(entry, scale):
    """A constant gradient of 1e20-1e38 for 5 steps. Optimizers that square the gradient refuse each such
    step (FloatingPointError naming it; with skip_nonfinite_grads it is skipped and counted), nothing
    modified: before, second moments capped at float32's max gave steps of 1e2 (1e25) to 1e7 (1e30) at lr
    1e-3. Those that do not square it (Adafactor: RMS-clipped; Shampoo with SGD grafting: momentum SGD,
    as torch.optim.SGD) move by what their rule says, finite."""
    params = _params([(5, 4)])
    opt = entry.make(params)
    limit = opt._max_grad_norm(params[0].shape, opt.param_groups[0], torch.float32)
    before = _values(params)
    if limit < scale:
        for _ in range(5):
            params[0].grad = torch.full((5, 4), scale)
            with pytest.raises(FloatingPointError, match="gradient too large for parameter 0 of param group 0"):
                opt.step()
        assert_bitwise_equal(_values(params), before)
        assert not any(opt.state.values())
        skipping = entry.make(params, skip_nonfinite_grads=True)
        with pytest.warns(RuntimeWarning, match="gradient too large"):
            for _ in range(5):
                params[0].grad = torch.full((5, 4), scale)
                skipping.step()
        assert_bitwise_equal(_values(params), before)
        assert skipping.param_groups[0]["skipped_steps"] == 5
        return
    assert isinstance(opt, Adafactor), "only Adafactor of the registry takes every finite gradient"
    for _ in range(5):
        params[0].grad = torch.full((5, 4), scale)
        opt.step()
    moved = (params[0] - before[0]).square().mean().sqrt()
    lr = float(opt.param_groups[0]["lr"])
    assert torch.isfinite(params[0]).all() and moved <= 5 * lr * (1 + 1e-5) * (1 + opt.param_groups[0]["weight_decay"] * 100)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_opposite_huge_gradients_never_make_a_parameter_infinite(cls, foreach):
    """3e38, then -1.5e38: the first moment's lerp computed g - m = -4.5e38 = -inf, and the parameter
    became infinite. Both steps are now refused (the limit keeps every moment below sqrt(max)/2, so the
    lerp cannot overflow); skipped under skip_nonfinite_grads; the parameter stays finite and unchanged."""
    for skip in (False, True):
        params = _params([(3,)])
        opt = cls(params, foreach=foreach, skip_nonfinite_grads=skip)
        _train(opt, params, 2)
        before, state_before = _values(params), optimizer_snapshot(opt)
        for value in (3e38, -1.5e38):
            params[0].grad = torch.full((3,), value)
            if skip:
                with pytest.warns(RuntimeWarning) if not opt._warned_skip else _nothing():
                    opt.step()
            else:
                with pytest.raises(FloatingPointError, match="gradient too large"):
                    opt.step()
        assert_bitwise_equal(_values(params), before)
        assert_bitwise_equal(optimizer_snapshot(opt), state_before)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- 10. Adafactor's eps
def test_adafactor_eps_must_stay_positive_in_the_state_dtype():
    with pytest.raises(ValueError, match=r"Invalid eps: 1e-46 is 0 in torch.float32"):
        Adafactor(_params([(4,)]), eps=1e-46)
    opt = Adafactor(_params([(4,)]))
    with pytest.raises(ValueError, match="Invalid eps"):
        opt.add_param_group({"params": _params([(3,)], seed=1), "eps": 1e-46})
    opt.param_groups[0]["eps"] = 1e-46  # set on the group: refused at the step, nothing modified
    params = opt.param_groups[0]["params"]
    params[0].grad = torch.tensor([0.0, 1.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="Invalid eps"):
        opt.step()
    assert not any(opt.state.values())
    # float64 state holds 1e-46: accepted, and a zero gradient entry stays finite (0 / sqrt(eps) = 0)
    wide = _params([(4,)], dtype=torch.float64)
    opt = Adafactor(wide, eps=1e-46)
    for _ in range(3):
        wide[0].grad = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
        opt.step()
    assert torch.isfinite(wide[0]).all()


# ----------------------------------------------------------------------------- 11. foreach=False AdamW
@pytest.mark.parametrize(
    "ours,theirs,hyper",
    [
        (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (AdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.99), amsgrad=True, maximize=True)),
        (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    ],
    ids=["adamw", "adamw-amsgrad-maximize", "adam-l2"],
)
def test_single_tensor_adam_is_bitwise_torch(ours, theirs, hyper):
    """The README promises torch's bits on CPU; foreach=False was 1 ulp off (another order of operations)."""
    a, b = _params([(50, 30), (30,)]), _params([(50, 30), (30,)])
    opt_a, opt_b = ours(a, foreach=False, **hyper), theirs(b, foreach=False, **hyper)
    for step in range(20):
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        opt_b.step()
    assert_bitwise_equal(_values(a), _values(b))
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(opt_a.state[p][key], opt_b.state[q][key], key)


# ----------------------------------------------------------------------------- 3. state that cannot fit
def test_state_that_cannot_fit_is_refused_before_anything_is_allocated(monkeypatch):
    """A (1000, 2) parameter with max_precond_dim=10000 needs a 1000 x 1000 factor and basis (8 MB, counted
    16x here to pass the estimate's 64 MB floor): with 16 MB available, a MemoryError naming the parameter
    and max_precond_dim, nothing modified; the same parameter steps once the memory is there."""
    import soap_optim.optimizer as base

    params = _params([(1000, 2)])
    opt = SOAP(params, foreach=False)
    _grads(params, 0)
    before = _values(params)
    monkeypatch.setattr(base, "available_bytes", lambda device: 2**24)
    monkeypatch.setattr(base, "_numel_of", _scaled(base._numel_of, 16))
    with pytest.raises(MemoryError, match=r"parameter 0 of param group 0 \(shape \(1000, 2\)\) alone.*max_precond_dim"):
        opt.step()
    assert not any(opt.state.values()) and torch.equal(params[0], before[0])
    monkeypatch.undo()
    opt.step()
    assert opt.state[params[0]]["factors"][0].shape == (1000, 1000)


def _scaled(count, factor):
    return lambda shapes: factor * count(shapes)


def test_a_factor_larger_than_this_machine_is_refused():
    """The issue's case: (100000, 2) with max_precond_dim=100000 asks for 80 GB (a factor and a basis of
    100000 x 100000 float32) and used to try to allocate it."""
    import soap_optim.optimizer as base

    available = base.available_bytes(torch.device("cpu"))
    if available is None or available > 60 * 2**30:
        pytest.skip("needs a machine with less than 60 GiB available (and /proc/meminfo)")
    params = _params([(100000, 2)])
    opt = SOAP(params, max_precond_dim=100000, foreach=False)
    _grads(params, 0)
    with pytest.raises(MemoryError, match=r"needs 74.5 GiB"):
        opt.step()
    assert not any(opt.state.values())
