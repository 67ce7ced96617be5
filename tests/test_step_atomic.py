"""A step happens whole or not at all: everything that can fail is checked before anything is modified.

Covers the base's step skeleton: per-step validation (values a scheduler or the user may change),
``fused=True`` where the kernels cannot run, options that decide the state's layout changed mid-run,
the gradient check on the effective gradient (state dtype, after orthograd), SOAP's limit on what it
can rotate, and ``skip_nonfinite_grads``. Each case compares against a snapshot taken before the
failing call: parameters, state and param groups must be bitwise unchanged.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from harness import entry_params, groups_without_params, kind, loss_at, make_model, params_of, train
from registry import assert_bitwise_equal, optimizer_snapshot
from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], optimizer_snapshot(opt), groups_without_params(opt)


def _assert_unchanged(model, opt, before):
    assert_bitwise_equal([p.detach() for p in model.parameters()], before[0], "params")
    assert_bitwise_equal(optimizer_snapshot(opt), before[1], "state")
    assert groups_without_params(opt) == before[2]


# ----------------------------------------------------------------------------- construction
def test_one_sided_dim_out_of_range_is_a_value_error_at_construction():
    weight = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"one_sided_dim: 2 .*shape \(3, 4\) has 2 merged axes"):
        SOAP([weight], one_sided=True, one_sided_dim=2)
    with pytest.raises(ValueError, match=r"one_sided_dim: -3"):
        SOAP([weight], one_sided=True, one_sided_dim=-3)
    for dim in (-2, -1, 0, 1):  # in range: accepted, and -1 is the last axis
        SOAP([weight], one_sided=True, one_sided_dim=dim)


@pytest.mark.parametrize("cls", [SOAP, Shampoo, Adam, AdamW, Adafactor])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32])
def test_float8_and_integer_parameters_are_value_errors_at_construction(cls, dtype):
    with pytest.raises(ValueError, match=f"floating-point parameters .*got {dtype}"):
        cls([torch.zeros(3, 3).to(dtype)])


@pytest.mark.parametrize("cls", [SOAP, Shampoo, Adam, AdamW])
def test_fused_true_where_the_kernels_cannot_run_is_refused_before_any_step(cls, monkeypatch):
    # float64 state: the kernels keep float32 state
    with pytest.raises(ValueError, match="fused=True cannot run here: the fused kernels keep float32 state"):
        cls([nn.Parameter(torch.randn(4, 4, dtype=torch.float64))], fused=True)
    # CPU tensors without Triton's interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="fused=True cannot run here: the fused kernels need CUDA tensors"):
        cls([nn.Parameter(torch.randn(4, 4))], fused=True)
    # switched on after some steps: refused at the step, nothing modified
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2)
    train(model, opt, 0, 3)
    before = _snapshot(model, opt)
    opt.param_groups[0]["fused"] = True
    with pytest.raises(ValueError, match="fused=True cannot run here"):
        train(model, opt, 3, 4)
    opt.param_groups[0]["fused"] = None
    before = before[0], before[1], groups_without_params(opt)
    _assert_unchanged(model, opt, before)


# ----------------------------------------------------------------------------- layout options mid-run
LAYOUT_CHANGES = [
    (SOAP, dict(foreach=False), "max_precond_dim", 3),
    (SOAP, dict(), "max_precond_dim", 3),
    (SOAP, dict(), "merge_dims", True),
    (SOAP, dict(foreach=False), "precondition_1d", True),
    (SOAP, dict(), "factorized", True),
    (SOAP, dict(), "one_sided", True),
    (SOAP, dict(), "state_dtype", torch.float64),
    (Shampoo, dict(), "max_precond_dim", 3),
    (Shampoo, dict(), "state_dtype", torch.float64),
    (AdamW, dict(), "state_dtype", torch.float64),
    (Adafactor, dict(), "state_dtype", torch.float64),
]


@pytest.mark.parametrize("cls,extra,option,value", LAYOUT_CHANGES,
                         ids=[f"{c.__name__}-{o}-{'one' if e else 'default'}" for c, e, o, _ in LAYOUT_CHANGES])
def test_an_option_that_decides_the_state_layout_cannot_change_mid_run(cls, extra, option, value):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2, **extra)
    train(model, opt, 0, 3)
    old = opt.param_groups[0][option]
    opt.param_groups[0][option] = value
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"built with {option}={old!r}, but it now has {option}={value!r}"):
        train(model, opt, 3, 4)
    _assert_unchanged(model, opt, before)
    opt.param_groups[0][option] = old  # put back: the run goes on as if nothing had happened
    reference = make_model()
    reference_opt = cls(reference.parameters(), lr=1e-2, **extra)
    train(reference, reference_opt, 0, 3)
    train(model, opt, 3, 5)
    train(reference, reference_opt, 3, 5)
    assert_bitwise_equal(params_of(model), params_of(reference))


@pytest.mark.parametrize("entry", entry_params())
def test_a_parameter_dtype_change_mid_run_is_refused(entry):
    """model.to(torch.float64) after some steps: the float32 state no longer fits the parameters."""
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, entry.warmup_steps + 2)
    state = optimizer_snapshot(opt)
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"parameter dtype=torch.float32, but it now has parameter dtype=torch.float64"):
        opt.zero_grad()
        loss_at(model, 9).backward()
        opt.step()
    assert_bitwise_equal(optimizer_snapshot(opt), state, "state")


# ----------------------------------------------------------------------------- the gradient as the math sees it
@pytest.mark.parametrize("entry", entry_params())
def test_a_float64_gradient_that_overflows_float32_state_is_refused(entry):
    """float64 parameters with state_dtype=torch.float32: the check runs on the gradient cast to the
    state's dtype, so 1e300 (finite in float64, inf in float32) is refused before anything is modified."""
    model = make_model(dtype=torch.float64)
    opt = entry.make(model.parameters(), state_dtype=torch.float32)
    train(model, opt, 0, entry.warmup_steps + 1)
    before = _snapshot(model, opt)
    opt.zero_grad()
    loss_at(model, 7).backward()
    list(model.parameters())[0].grad[0, 0] = 1e300
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .*in the state's dtype.* parameter 0"):
        opt.step()
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize("entry", entry_params())
def test_orthograd_on_gradients_near_float32_max_stays_finite(entry):
    """orthograd's dot products are taken on power-of-two-scaled vectors, so a finite gradient near the
    max gives a finite gradient of the same norm, and parameters and state stay finite. An optimizer that
    squares gradients refuses that norm (above sqrt(max)/2) after orthograd, with nothing modified."""
    model = make_model()
    opt = entry.make(model.parameters(), orthograd=True)
    refuses = opt._max_grad_norm(model[0].weight.shape, opt.param_groups[0], torch.float32) < 1e36
    for step in range(entry.warmup_steps + 3):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e37 / max(p.numel(), 1) ** 0.5
        if refuses:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(FloatingPointError, match="gradient too large"):
                opt.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
            continue
        opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for key, value in state.items():
            for t in value if isinstance(value, list) else [value]:
                assert t is None or bool(torch.isfinite(t).all()), key


@pytest.mark.parametrize("foreach", [False, None])
def test_soap_refuses_a_gradient_too_large_to_rotate(foreach):
    """||G||_F above sqrt(float32's max) / 2 could overflow the squares of the rotated gradient (each entry
    at most ||G||_F): refused before anything is modified. Just under it (sign-alternating entries
    included) the step is finite, with every second moment finite and below the max (no capping)."""
    weight, bias = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = SOAP([weight, bias], foreach=foreach)
    for step in range(3):
        weight.grad, bias.grad = torch.randn(4, 4), torch.randn(4)
        opt.step()
    limit = torch.finfo(torch.float32).max ** 0.5 / 2
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 4)
    weight.grad = signs * (limit / 4.01)  # ||G||_F just under the limit
    bias.grad = torch.full((4,), limit / 2.01)
    opt.step()
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    for v in (opt.state[weight]["exp_avg"], opt.state[weight]["exp_avg_sq"], opt.state[bias]["exp_avg_sq"]):
        assert torch.isfinite(v).all() and (v < torch.finfo(torch.float32).max).all()
    before = weight.detach().clone(), optimizer_snapshot(opt)
    weight.grad = signs * (limit / 3.9)  # ||G||_F just over the limit
    with pytest.raises(FloatingPointError, match=r"gradient too large for parameter 0 .*norm 9.46\de\+18"):
        opt.step()
    assert_bitwise_equal(weight.detach(), before[0])
    assert_bitwise_equal(optimizer_snapshot(opt), before[1])


# ----------------------------------------------------------------------------- skipping
@pytest.mark.parametrize("entry", entry_params())
def test_skip_nonfinite_grads_skips_warns_once_and_counts(entry):
    """skip_nonfinite_grads=True: a step with a NaN gradient changes nothing but the groups'
    'skipped_steps', warns once; the run then equals one that never saw those steps."""
    model, reference = make_model(), make_model()
    opt = entry.make(model.parameters(), skip_nonfinite_grads=True)
    reference_opt = entry.make(reference.parameters(), skip_nonfinite_grads=True)
    train(model, opt, 0, entry.warmup_steps + 1)
    train(reference, reference_opt, 0, entry.warmup_steps + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            loss_at(model, 50).backward()
            list(model.parameters())[2].grad[0, 0] = float("nan")
            opt.step()
    skip_warnings = [w for w in caught if "skipping the step" in str(w.message)]
    assert len(skip_warnings) == 1 and "parameter 2" in str(skip_warnings[0].message)
    assert opt.param_groups[0]["skipped_steps"] == 2
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(reference_opt))
    train(model, opt, entry.warmup_steps + 1, entry.warmup_steps + 4)
    train(reference, reference_opt, entry.warmup_steps + 1, entry.warmup_steps + 4)
    assert_bitwise_equal(params_of(model), params_of(reference))
    # the count survives a state-dict round trip
    fresh = entry.make(make_model().parameters(), skip_nonfinite_grads=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["skipped_steps"] == 2
    # the default still raises
    assert kind(entry)(make_model().parameters()).param_groups[0]["skip_nonfinite_grads"] is False
