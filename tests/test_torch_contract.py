"""torch.optim's generic contract, checked through torch's OptimizerInfo machinery.

Every entry of ``optim_infos.OPTIM_INFOS`` (Adam, AdamW, SOAP with several option sets, Shampoo,
Adafactor) is run through the checks below, most of them once per ``OptimizerInput`` of the entry
(lr as a float and as a 0-d tensor, weight decay, maximize, foreach True/False, ...). Where an
independent reference exists it is used: a torch.optim optimizer (as control in the hook tests, as
the writer of the state dicts loaded in the cross-loading tests), a torch.optim.SGD carrying the
same scheduler, a float64 run for the low-precision checks.

Checks: error inputs (ValueError naming the bad value; sparse and NaN gradients rejected at step()),
loaded hyperparameters validated, state_dict round trip (bitwise), older state dicts (missing
hyperparameter keys filled with defaults; a plain-number ``step``), torch.optim state dicts loaded
into soap_optim's Adam/AdamW, load_state_dict / state_dict / step pre- and post-hooks, param groups
(add_param_group, per-group lr, lr=0), schedulers, tensor lr, tensor betas, foreach vs for-loop,
zero gradients, gradients set to None, deepcopy and pickling, closures, bf16/fp16/float64
parameters, one step moves the parameters downhill.

Checks that cannot apply, skipped with these reasons (see optim_infos.py):

* complex parameters (every entry): rejected with ValueError at construction; the eigenbases and
  factored moments are defined for real matrices, so torch's ``view_as_real`` equivalence check has
  nothing to compare. The rejection itself is checked in ``test_error_inputs``.
* sparse gradients (every entry): rejected with ValueError at ``step()`` before anything changes;
  Kronecker factors, eigenbases and factored moments need dense gradients. The rejection is checked
  in ``test_error_inputs``.
* foreach vs for-loop: Shampoo and Adafactor have no ``foreach`` option; the SOAP entries that pin
  an option set (one_sided, factorized, foreach=False, precondition_1d, merge_dims) leave it to the
  ``soap`` entry; the ``soap`` entry needs ``soap_optim.kernels`` for its batched path.
* one step moves the parameters (every SOAP entry): SOAP's first ``step()`` only builds the
  preconditioner (factors and bases from the first gradient) and leaves the parameters unchanged.
  Every other check that needs movement runs ``warmup_steps`` extra steps for SOAP.
* tensor betas (Adafactor): it has ``beta1`` and ``beta2_decay``, no ``betas`` pair.
"""
from __future__ import annotations

import copy
import io
import pickle
import re
from typing import Any, Dict, List

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import OptimizerErrorEnum

from optim_infos import OPTIM_INFOS, SoapOptimizerInfo
from registry import assert_bitwise_equal, iter_state_tensors, optimizer_snapshot, snapshot

DEVICE = "cpu"
# two same-shaped matrices (a batched path forms a bucket of two), a vector, a 3-D tensor (merge_dims)
SHAPES = [(4, 3), (4, 3), (3,), (2, 2, 3)]


def _info_params(infos=OPTIM_INFOS):
    return [pytest.param(info, id=info.variant) for info in infos]


def _input_params(infos=OPTIM_INFOS, keep=lambda info, oi: True):
    return [
        pytest.param(info, oi, id=f"{info.variant}-{oi.desc.replace(' ', '_')}")
        for info in infos
        for oi in info.optim_inputs_func(DEVICE, torch.float32)
        if keep(info, oi)
    ]


def skip_if_not_applicable(info: SoapOptimizerInfo, check: str) -> None:
    if check in info.not_applicable:
        pytest.skip(info.not_applicable[check])


# ----------------------------------------------------------------------------- params, grads, runs
def make_params(dtype=torch.float32, seed=0, shapes=SHAPES) -> List[Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params) -> List[Parameter]:
    return [Parameter(p.detach().clone()) for p in params]


def grads_at(step: int, params) -> List[torch.Tensor]:
    """The gradients of global step ``step`` (the same in every run), in each parameter's dtype."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def run(opt, params, start: int, stop: int, skip=()) -> None:
    """Global steps ``start .. stop - 1``; parameters with an index in ``skip`` get no gradient."""
    for step in range(start, stop):
        for i, (p, g) in enumerate(zip(params, grads_at(step, params))):
            p.grad = None if i in skip else g
        opt.step()


def values(params) -> List[torch.Tensor]:
    return [p.detach().clone() for p in params]


def through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def kwargs_of(oi, **overrides) -> Dict[str, Any]:
    return {**oi.kwargs, **overrides}


def default_input(info):
    return info.optim_inputs_func(DEVICE, torch.float32)[0]


def moving_steps(info, extra: int = 3) -> int:
    return info.warmup_steps + extra


# ----------------------------------------------------------------------------- error inputs
@pytest.mark.parametrize("info", _info_params())
def test_error_inputs(info):
    for error in info.optim_error_inputs_func(DEVICE, torch.float32):
        oi = error.optimizer_error_input
        params = oi.params if oi.params is not None else make_params()
        if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                info.optim_cls(params, **oi.kwargs)
        else:
            opt = info.optim_cls(params, **oi.kwargs)
            before = values(params)
            with pytest.raises(error.error_type, match=error.error_regex):
                opt.step()
            # rejected before anything is touched
            assert_bitwise_equal(values(params), before, oi.desc)
            assert all(not opt.state.get(p) for p in params), oi.desc


@pytest.mark.parametrize("info", _info_params())
def test_loaded_hyperparameters_are_validated(info):
    """A state dict with a bad hyperparameter is refused as the constructor refuses it, and nothing loads."""
    errors = [e for e in info.optim_error_inputs_func(DEVICE, torch.float32)
              if e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR and e.optimizer_error_input.params is None]
    assert errors
    oi = default_input(info)
    source_params = make_params()
    source = info.optim_cls(source_params, **oi.kwargs)
    run(source, source_params, 0, 2)
    accepted = []
    for error in errors:
        bad = error.optimizer_error_input.kwargs
        state_dict = copy.deepcopy(source.state_dict())
        state_dict["param_groups"][0].update({k: v for k, v in bad.items()})
        params = clone_params(source_params)
        opt = info.optim_cls(params, **oi.kwargs)
        groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            opt.load_state_dict(state_dict)
        except error.error_type as raised:
            assert re.search(error.error_regex, str(raised)), (error.optimizer_error_input.desc, str(raised))
            assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
            assert len(opt.state) == 0
        else:
            accepted.append(error.optimizer_error_input.desc)
    assert not accepted, f"load_state_dict accepted invalid hyperparameters: {accepted}"


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("info,oi", _input_params())
def test_state_dict_round_trip(info, oi):
    """Step N, save (through bytes), load into a fresh optimizer on cloned params, M more steps on both."""
    n, m = info.warmup_steps + 3, 3
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    run(opt, params, 0, n)
    saved = through_bytes(opt.state_dict())
    fresh_params = clone_params(params)
    # constructed with another lr: the loaded param_groups must win
    fresh = info.optim_cls(fresh_params, **kwargs_of(oi, lr=0.5))
    fresh.load_state_dict(saved)
    assert_bitwise_equal(optimizer_snapshot(fresh), optimizer_snapshot(opt), "loaded state")
    run(opt, params, n, n + m)
    run(fresh, fresh_params, n, n + m)
    assert_bitwise_equal(values(fresh_params), values(params), "params")
    assert_bitwise_equal(optimizer_snapshot(fresh), optimizer_snapshot(opt), "state")
    a, b = fresh.state_dict(), opt.state_dict()
    assert_bitwise_equal(a["param_groups"], b["param_groups"], "param_groups")
    # saving twice gives the same dict (state_dict is deterministic and does not change the optimizer)
    assert_bitwise_equal(snapshot(opt.state_dict()), snapshot(b), "state_dict twice")


@pytest.mark.parametrize("info,oi", _input_params())
def test_load_older_state_dict_fills_defaults(info, oi):
    """torch's ``__setstate__`` convention: a state dict written before a flag existed lacks its key;
    loading fills in the default and training continues exactly as without the round trip."""
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    n = info.warmup_steps + 2
    run(opt, params, 0, n)
    state_dict = copy.deepcopy(opt.state_dict())
    dropped = []
    for key in info.not_og_supported_flags:
        group = state_dict["param_groups"][0]
        if key in group and group[key] == info.class_default(key):
            del group[key]
            dropped.append(key)
    assert dropped
    fresh_params = clone_params(params)
    fresh = info.optim_cls(fresh_params, **oi.kwargs)
    fresh.load_state_dict(state_dict)
    for key in dropped:
        assert key in fresh.param_groups[0], f"{key} not filled in"
        assert fresh.param_groups[0][key] == info.class_default(key), key
    run(opt, params, n, n + 2)
    run(fresh, fresh_params, n, n + 2)
    assert_bitwise_equal(values(fresh_params), values(params))
    assert_bitwise_equal(optimizer_snapshot(fresh), optimizer_snapshot(opt))


@pytest.mark.parametrize("info", _info_params())
def test_load_state_dict_with_number_step(info):
    """State dicts of older torch versions hold ``step`` as a plain Python number."""
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    n = info.warmup_steps + 2
    run(opt, params, 0, n)
    state_dict = copy.deepcopy(opt.state_dict())
    for state in state_dict["state"].values():
        state["step"] = float(state["step"])
    fresh_params = clone_params(params)
    fresh = info.optim_cls(fresh_params, **oi.kwargs)
    fresh.load_state_dict(state_dict)
    run(opt, params, n, n + 2)
    run(fresh, fresh_params, n, n + 2)
    assert_bitwise_equal(values(fresh_params), values(params))
    for a, b in zip(optimizer_snapshot(fresh), optimizer_snapshot(opt)):
        assert float(a["step"]) == float(b["step"])
        assert_bitwise_equal({k: v for k, v in a.items() if k != "step"}, {k: v for k, v in b.items() if k != "step"})


@pytest.mark.parametrize("info", _info_params([i for i in OPTIM_INFOS if i.reference_cls is not None]))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_load_torch_optim_state_dict(info, amsgrad):
    """A checkpoint of torch.optim.Adam(W) loads into soap_optim's twin, which continues as torch does.

    torch's state dict lacks orthograd and state_dtype (and has keys of its own: capturable,
    differentiable, decoupled_weight_decay); the defaults must be filled in. The twins use the same
    formula but not necessarily the same op order (torch's foreach Adam folds the bias corrections
    differently), so the continuation agrees to rounding: per step each coordinate moves by at most
    about lr (|m_hat / sqrt(v_hat)| <= 1 for beta1^2 <= beta2), computed with a relative error of a
    few float32 ulps, so after k steps the difference is below k * lr * 16 * eps32 plus the ulps of
    the parameters themselves.
    """
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    torch_params = make_params()
    torch_opt = info.reference_cls(torch_params, **kwargs)
    run(torch_opt, torch_params, 0, 3)
    params = clone_params(torch_params)
    opt = info.optim_cls(params, **kwargs)
    opt.load_state_dict(through_bytes(torch_opt.state_dict()))
    k = 3
    run(torch_opt, torch_params, 3, 3 + k)
    run(opt, params, 3, 3 + k)
    eps32 = torch.finfo(torch.float32).eps
    for p, q in zip(params, torch_params):
        bound = k * (kwargs["lr"] * 16 * eps32 + 2 * eps32 * q.detach().abs().max().item())
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=bound)


# ----------------------------------------------------------------------------- hooks
def _control_and_subject(info):
    """(factory, name) pairs: torch.optim.AdamW (the control: the test must pass on it) and ``info``."""
    oi = default_input(info)
    return [
        (lambda params: torch.optim.AdamW(params, lr=1e-2), "torch.optim.AdamW"),
        (lambda params: info.optim_cls(params, **oi.kwargs), info.variant),
    ]


def _trained(factory, steps, lr=None):
    params = make_params()
    opt = factory(params)
    if lr is not None:
        opt.param_groups[0]["lr"] = lr
    run(opt, params, 0, steps)
    return params, opt


@pytest.mark.parametrize("info", _info_params())
def test_load_state_dict_pre_hook_result_is_loaded(info):
    for factory, name in _control_and_subject(info):
        params, source = _trained(factory, info.warmup_steps + 2)
        _, other = _trained(factory, info.warmup_steps + 4, lr=0.0625)
        replacement = copy.deepcopy(other.state_dict())
        seen = []

        def pre_hook(optimizer, state_dict):
            seen.append((optimizer, state_dict))
            return copy.deepcopy(replacement)

        target = factory(clone_params(params))
        target.register_load_state_dict_pre_hook(pre_hook)
        passed = source.state_dict()
        target.load_state_dict(passed)
        assert len(seen) == 1 and seen[0][0] is target, name
        assert_bitwise_equal(snapshot(seen[0][1]["state"]), snapshot(passed["state"]), f"{name}: hook input")
        assert target.param_groups[0]["lr"] == 0.0625, f"{name}: hook's param_groups not used"
        assert_bitwise_equal(optimizer_snapshot(target), optimizer_snapshot(other), f"{name}: hook's state not used")


@pytest.mark.parametrize("info", _info_params())
def test_load_state_dict_post_hook_edits_stick(info):
    for factory, name in _control_and_subject(info):
        params, source = _trained(factory, info.warmup_steps + 2)
        loaded_at_hook = []

        def post_hook(optimizer):
            loaded_at_hook.append(optimizer_snapshot(optimizer))
            optimizer.param_groups[0]["lr"] = 0.03125
            for state in optimizer.state.values():
                for key, value in state.items():
                    if key != "step":
                        for t in iter_state_tensors(value):
                            if t.is_floating_point():
                                t.zero_()
                state["edited_by_hook"] = True

        target = factory(clone_params(params))
        handle = target.register_load_state_dict_post_hook(post_hook)
        # a copy: torch.optim's load keeps same-dtype tensors, so the hook's in-place edit would reach source
        target.load_state_dict(copy.deepcopy(source.state_dict()))
        # the hook ran after the load ...
        assert len(loaded_at_hook) == 1, name
        assert_bitwise_equal(loaded_at_hook[0], optimizer_snapshot(source), f"{name}: state at hook time")
        # ... and its edits stick
        assert target.param_groups[0]["lr"] == 0.03125, name
        for p in target.param_groups[0]["params"]:
            state = target.state[p]
            assert state.get("edited_by_hook") is True, f"{name}: post-hook edit lost"
            for key, value in state.items():
                if key not in ("step", "edited_by_hook"):
                    for t in iter_state_tensors(value):
                        assert not t.any(), f"{name}: post-hook's in-place edit of {key!r} lost"
        handle.remove()
        target.load_state_dict(copy.deepcopy(source.state_dict()))
        assert len(loaded_at_hook) == 1, name


@pytest.mark.parametrize("info", _info_params())
def test_state_dict_hooks(info):
    for factory, name in _control_and_subject(info):
        params, opt = _trained(factory, info.warmup_steps + 1)
        calls = []

        def pre_hook(optimizer):
            calls.append("pre")
            optimizer.param_groups[0]["lr"] = 0.015625  # visible in the dict being built

        def post_hook(optimizer, state_dict):
            calls.append("post")
            assert state_dict["param_groups"][0]["lr"] == 0.015625
            return {**state_dict, "extra": "from post hook"}

        pre = opt.register_state_dict_pre_hook(pre_hook)
        post = opt.register_state_dict_post_hook(post_hook)
        state_dict = opt.state_dict()
        assert calls == ["pre", "post"], name
        assert state_dict["extra"] == "from post hook", name
        assert state_dict["param_groups"][0]["lr"] == 0.015625, name
        pre.remove()
        post.remove()
        assert "extra" not in opt.state_dict() and calls == ["pre", "post"], name


@pytest.mark.parametrize("info", _info_params())
def test_step_hooks(info):
    """Step pre-hooks may replace step's arguments; post-hooks see them; global hooks run too."""
    for factory, name in _control_and_subject(info):
        params = make_params()
        opt = factory(params)
        events = []

        def closure():
            events.append("closure")
            return torch.tensor(1.0)

        def replacement():
            events.append("replacement")
            for p, g in zip(params, grads_at(0, params)):
                p.grad = g
            return torch.tensor(2.0)

        def pre_hook(optimizer, args, kwargs):
            events.append("pre")
            assert optimizer is opt and args[0] is opt and kwargs == {"closure": closure}
            return args, {"closure": replacement}

        def post_hook(optimizer, args, kwargs):
            events.append(("post", kwargs["closure"].__name__))

        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: events.append("global pre")),
            register_optimizer_step_post_hook(lambda o, a, k: events.append("global post")),
            opt.register_step_pre_hook(pre_hook),
            opt.register_step_post_hook(post_hook),
        ]
        try:
            loss = opt.step(closure=closure)
        finally:
            for handle in handles:
                handle.remove()
        assert float(loss) == 2.0, name
        assert events == ["global pre", "pre", "replacement", ("post", "replacement"), "global post"], name
        assert all(opt.state.get(p) for p in params), name


# ----------------------------------------------------------------------------- param groups, schedulers
@pytest.mark.parametrize("info,oi", _input_params())
def test_param_groups(info, oi):
    """add_param_group with its own lr, and a group with lr=0: each group evolves as if alone."""
    steps = moving_steps(info)
    init = make_params()
    params = clone_params(init)
    opt = info.optim_cls([params[0], params[2]], **oi.kwargs)
    opt.add_param_group({"params": [params[1]], "lr": 3 * float(oi.kwargs["lr"])})
    opt.add_param_group({"params": [params[3]], "lr": 0.0})
    assert [float(g["lr"]) for g in opt.param_groups] == [float(oi.kwargs["lr"]), 3 * float(oi.kwargs["lr"]), 0.0]
    for key in opt.defaults:
        assert key in opt.param_groups[1] and key in opt.param_groups[2], key
    run(opt, params, 0, steps)
    assert_bitwise_equal(params[3].detach(), init[3].detach(), "lr=0 group moved")
    assert opt.state.get(params[3]), "lr=0 group has no state"

    def alone(indices, **overrides):
        sub = [clone_params(init)[i] for i in indices]
        sub_opt = info.optim_cls(sub, **kwargs_of(oi, **overrides))
        for step in range(steps):
            grads = grads_at(step, init)
            for p, i in zip(sub, indices):
                p.grad = grads[i]
            sub_opt.step()
        return values(sub)

    assert_bitwise_equal(values([params[0], params[2]]), alone([0, 2]), "group 0")
    assert_bitwise_equal(values([params[1]]), alone([1], lr=3 * float(oi.kwargs["lr"])), "group 1")
    assert not torch.equal(params[1].detach(), alone([1])[0])


@pytest.mark.parametrize("info", _info_params())
def test_schedulers_drive_lr(info):
    oi = default_input(info)
    steps = moving_steps(info)
    for make_scheduler in info.scheduler_inputs[0]:
        params = make_params()
        opt = info.optim_cls(params, **oi.kwargs)
        scheduler = make_scheduler(opt)
        control = torch.optim.SGD([Parameter(torch.zeros(1))], lr=oi.kwargs["lr"])
        control_scheduler = make_scheduler(control)
        used = []
        for step in range(steps):
            used.append(opt.param_groups[0]["lr"])
            assert used[-1] == control.param_groups[0]["lr"]
            run(opt, params, step, step + 1)
            scheduler.step()
            control.step()
            control_scheduler.step()
        assert len(set(used)) > 1
        manual_params = make_params()
        manual = info.optim_cls(manual_params, **oi.kwargs)
        for step, lr in enumerate(used):
            manual.param_groups[0]["lr"] = lr
            run(manual, manual_params, step, step + 1)
        assert_bitwise_equal(values(manual_params), values(params))


# ----------------------------------------------------------------------------- tensor hyperparameters
@pytest.mark.parametrize(
    "info,oi", _input_params(keep=lambda info, oi: isinstance(oi.kwargs["lr"], torch.Tensor))
)
def test_tensor_lr_equals_float_lr(info, oi):
    steps = moving_steps(info)
    a = make_params()
    run(info.optim_cls(a, **oi.kwargs), a, 0, steps)
    b = make_params()
    run(info.optim_cls(b, **kwargs_of(oi, lr=oi.kwargs["lr"].item())), b, 0, steps)
    assert_bitwise_equal(values(a), values(b))
    assert not torch.equal(a[0].detach(), make_params()[0].detach())


@pytest.mark.parametrize("info", _info_params())
def test_tensor_betas_equal_float_betas(info):
    """0-d tensor betas step exactly as float betas (one-element ones of other shapes too, see
    test_trust_round3); a tensor of several elements is a ValueError naming it, at construction."""
    if "betas" not in default_input(info).kwargs:
        pytest.skip(f"{info.optim_cls.__name__} has no betas pair (beta1 and beta2_decay instead)")
    oi = default_input(info)
    beta1, beta2 = oi.kwargs["betas"]
    steps = moving_steps(info)
    a = make_params()
    run(info.optim_cls(a, **oi.kwargs), a, 0, steps)
    b = make_params()
    betas = (torch.tensor(beta1, dtype=torch.float64), torch.tensor(beta2, dtype=torch.float64))
    run(info.optim_cls(b, **kwargs_of(oi, betas=betas)), b, 0, steps)
    assert_bitwise_equal(values(b), values(a))
    with pytest.raises(ValueError, match=r"betas\[0\] must be a Python number or a one-element"):
        info.optim_cls(make_params(), **kwargs_of(oi, betas=(torch.tensor([beta1, beta1]), beta2)))


# ----------------------------------------------------------------------------- foreach vs for-loop
def _foreach_tolerance(info, oi, steps, params) -> float:
    """Bound on |foreach - for-loop| after ``steps`` steps, from the rounding of each step.

    Adam: the two paths run the same elementwise formula in another grouping (torch._foreach_* ops vs
    per-tensor ops; the bias corrections folded differently), each result within a few float32 ulps of
    the exact update, and |update| <= lr (|m_hat / sqrt(v_hat)| <= 1 for beta1^2 <= beta2): per step
    at most lr * 16 * eps32 plus an ulp of the parameter.
    SOAP: the batched path stacks same-shaped matrices and runs bmm where the for-loop runs mm; each
    rotation is a dot product of length d <= 4 (gamma_d = d * eps32), done twice (rotate, rotate back)
    and through the eigenbasis refreshed from factors that themselves differ by d * eps32 relative
    (well-separated eigenvalues for these random gradients, so the bases move by a comparable amount):
    per step at most lr * 64 * d * eps32 plus an ulp of the parameter.
    """
    eps32 = torch.finfo(torch.float32).eps
    lr = float(oi.kwargs["lr"])
    biggest = max(p.detach().abs().max().item() for p in params)
    factor = 16 if info.optim_cls.__name__.startswith("Adam") else 64 * max(max(p.shape) for p in params)
    return steps * (lr * factor * eps32 + 2 * eps32 * biggest)


@pytest.mark.parametrize("info,oi", _input_params(keep=lambda info, oi: "foreach" not in oi.kwargs))
def test_foreach_matches_for_loop(info, oi):
    skip_if_not_applicable(info, "foreach")
    steps = info.warmup_steps + 4
    runs = {}
    for foreach in (True, False):
        params = make_params()
        opt = info.optim_cls(params, **kwargs_of(oi, foreach=foreach))
        run(opt, params, 0, steps)
        runs[foreach] = (params, opt)
    (a, opt_a), (b, opt_b) = runs[True], runs[False]
    bound = _foreach_tolerance(info, oi, steps, b)
    for p, q, init in zip(a, b, make_params()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=bound)
        assert not torch.equal(p.detach(), init.detach())
    for sa, sb in zip(optimizer_snapshot(opt_a), optimizer_snapshot(opt_b)):
        assert sa.keys() == sb.keys()
        assert float(sa["step"]) == float(sb["step"])


# ----------------------------------------------------------------------------- zero and missing grads
@pytest.mark.parametrize("info,oi", _input_params(keep=lambda info, oi: oi.kwargs.get("weight_decay", 0) == 0))
def test_zero_gradients_do_not_move_params(info, oi):
    """All-zero gradients from the start, no weight decay: parameters stay put, state stays finite."""
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    before = values(params)
    for _ in range(info.warmup_steps + 3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_bitwise_equal(values(params), before)
    for p in params:
        assert opt.state.get(p), "a zero gradient is a gradient: the parameter gets state"
        for t in iter_state_tensors(opt.state[p]):
            assert not t.is_floating_point() or bool(t.isfinite().all())


@pytest.mark.parametrize("info,oi", _input_params())
def test_params_without_grad_keep_their_state(info, oi):
    """After some training, parameters whose grad is None are skipped: value and state untouched."""
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    n = info.warmup_steps + 2
    run(opt, params, 0, n)
    skipped = (1, 3)
    state_before = optimizer_snapshot(opt)
    before = values(params)
    run(opt, params, n, n + 2, skip=skipped)
    state_after = optimizer_snapshot(opt)
    for i in range(len(params)):
        if i in skipped:
            assert_bitwise_equal(params[i].detach(), before[i], f"param {i}")
            assert_bitwise_equal(state_after[i], state_before[i], f"state {i}")
        else:
            assert not torch.equal(params[i].detach(), before[i]), f"param {i} did not move"
            assert float(state_after[i]["step"]) == float(state_before[i]["step"]) + 2


# ----------------------------------------------------------------------------- copies
@pytest.mark.parametrize("info", _info_params())
def test_deepcopy(info):
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    n = info.warmup_steps + 2
    run(opt, params, 0, n)
    twin = copy.deepcopy(opt)
    public = lambda o: sorted(k for k in vars(o) if not k.startswith("_"))
    assert public(twin) == public(opt)
    # (torch's __setstate__, which deepcopy runs, adds "differentiable" to defaults)
    assert {k: twin.defaults[k] for k in opt.defaults} == opt.defaults and twin.defaults is not opt.defaults
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(twin_params, params))
    assert_bitwise_equal(optimizer_snapshot(twin), optimizer_snapshot(opt))
    before = values(params)
    run(twin, twin_params, n, n + 2)
    assert_bitwise_equal(values(params), before, "stepping the copy moved the original")
    run(opt, params, n, n + 2)
    assert_bitwise_equal(values(twin_params), values(params))
    assert_bitwise_equal(optimizer_snapshot(twin), optimizer_snapshot(opt))


@pytest.mark.parametrize("info", _info_params())
def test_pickle(info):
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    n = info.warmup_steps + 2
    run(opt, params, 0, n)
    state_dict = pickle.loads(pickle.dumps(opt.state_dict()))
    assert_bitwise_equal(snapshot(state_dict), snapshot(opt.state_dict()))
    # the optimizer itself pickles too (torch.optim's __getstate__/__setstate__), params included
    revived = pickle.loads(pickle.dumps(opt))
    revived_params = [p for g in revived.param_groups for p in g["params"]]
    run(revived, revived_params, n, n + 2)
    run(opt, params, n, n + 2)
    assert_bitwise_equal(values(revived_params), values(params))
    handle = revived.register_step_post_hook(lambda *a: None)  # hooks dicts restored by __setstate__
    handle.remove()


# ----------------------------------------------------------------------------- closures
@pytest.mark.parametrize("info", _info_params())
def test_closure_called_once_and_loss_returned(info):
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    target = make_params(seed=3)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target))
        loss.backward()
        return loss

    losses = []
    for _ in range(moving_steps(info, 5)):
        with torch.no_grad():
            expected = sum(((p - t) ** 2).sum() for p, t in zip(params, target))
        loss = opt.step(closure)
        assert_bitwise_equal(loss.detach(), expected)
        losses.append(float(loss.detach()))
    assert calls == [True] * len(losses)
    assert losses[-1] < losses[0]
    assert all(p.grad_fn is None and p.is_leaf for p in params)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("info", _info_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_param_dtypes(info, dtype):
    """bf16/fp16/float64 parameters: dtype kept, state float32 (float64 for float64), close to float64.

    The reference is a float64 run with float32 state (``state_dtype=torch.float32``) fed the same
    (rounded to ``dtype``) gradients. Its updates are then computed exactly as the low-precision
    run's: same gradients, same float32 state; the gradients do not depend on the parameters and
    weight decay is 0, so nothing feeds back. What differs is the rounding of the updated parameter:
    to ``dtype`` (at most eps(dtype) * |theta| per step) against float32 (eps32 * |theta|, the update
    is applied in the state's precision). (A float64-state reference is no reference here: in SOAP's
    rotated coordinates along a factor's null space the gradient is rounding noise r, and
    r / (|r| + eps) is O(1) whatever the precision.) For float64 parameters a second float64 run must
    agree bitwise.
    """
    oi = default_input(info)
    steps = moving_steps(info)
    params = make_params(dtype)
    opt = info.optim_cls(params, **oi.kwargs)
    run(opt, params, 0, steps)
    assert all(p.dtype == dtype for p in params)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for p in params:
        for key, value in opt.state[p].items():
            for t in iter_state_tensors(value):
                if key != "step" and t.is_floating_point():
                    assert t.dtype == state_dtype, (key, t.dtype)
                    assert bool(t.isfinite().all()), key
    if dtype == torch.float64:
        again = make_params(dtype)
        run(info.optim_cls(again, **oi.kwargs), again, 0, steps)
        assert_bitwise_equal(values(again), values(params))
        return
    # float64 reference with float32 state, fed the very gradients the low-precision run saw
    reference = [Parameter(p.detach().double()) for p in make_params(dtype)]
    ref_opt = info.optim_cls(reference, **kwargs_of(oi, state_dtype=torch.float32))
    low = make_params(dtype)
    for step in range(steps):
        for r, g in zip(reference, grads_at(step, low)):
            r.grad = g.double()
        ref_opt.step()
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
    lr = float(oi.kwargs["lr"])
    for p, r in zip(params, reference):
        bound = steps * (eps + 2 * eps32) * (r.detach().abs().max().item() + lr)
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=0, atol=bound)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(params, values(make_params(dtype))))


# ----------------------------------------------------------------------------- first step, non-applicable
@pytest.mark.parametrize("info", _info_params())
def test_first_step_moves_params_downhill(info):
    skip_if_not_applicable(info, "first_step_moves")
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    before = values(params)
    grads = grads_at(0, params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, b, g in zip(params, before, grads):
        delta = p.detach() - b
        assert delta.any()
        assert float((delta * g).sum()) < 0, "the step is not a descent direction"


@pytest.mark.parametrize("info", _info_params([i for i in OPTIM_INFOS if i.variant == "soap"]))
def test_soap_first_step_only_builds_preconditioner(info):
    """What 'SOAP's first step' means, so that the skip above stays honest."""
    oi = default_input(info)
    params = make_params()
    opt = info.optim_cls(params, **oi.kwargs)
    before = values(params)
    run(opt, params, 0, 1)
    assert_bitwise_equal(values(params), before)
    assert all(opt.state[p]["factors"] for p in params)
    run(opt, params, 1, 2)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("info", _info_params())
def test_complex_params(info):
    skip_if_not_applicable(info, "complex")
    raise AssertionError("no entry supports complex parameters")


@pytest.mark.parametrize("info", _info_params())
def test_sparse_grads(info):
    skip_if_not_applicable(info, "sparse")
    raise AssertionError("no entry supports sparse gradients")
