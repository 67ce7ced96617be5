"""Reduced precision, for every optimizer configuration (tests/harness.py ENTRIES).

* bf16/fp16 parameters: all floating state is float32, and each step is computed in float32 from the
  float32 state and rounded to the parameter's dtype once: a step on a bf16 parameter equals the same
  step on a float32 copy of it, rounded.
* A float32 model trained under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
* ``torch.amp.GradScaler("cpu")``: with a power-of-two scale the scaled run equals the unscaled one bit
  for bit; a step whose gradients hold an Inf is skipped by the scaler (our ``step`` is not called) and
  leaves params and state bitwise unchanged.
"""
from __future__ import annotations

import pytest
import torch

from harness import (
    entry_params,
    floating_state_dtypes,
    loss_at,
    make_model,
    non_finite_state,
    params_of,
    train,
)
from registry import assert_bitwise_equal, optimizer_snapshot

STEPS = 12  # SOAP/Shampoo: through bases/roots refreshes (harness.refresh_calls)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("entry", entry_params())
def test_low_precision_params_float32_state_and_single_rounding(entry, dtype):
    model = make_model(dtype=dtype)
    opt = entry.make(model.parameters())
    losses = train(model, opt, 0, STEPS)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert floating_state_dtypes(opt) == {torch.float32}
    assert non_finite_state(opt) == {}
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses

    # one more step, on the low-precision model and on a float32 copy with the same state and gradient
    twin = make_model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            q.copy_(p.float())
    twin_opt = entry.make(twin.parameters())
    twin_opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    loss_at(model, STEPS).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.float()
    opt.step()
    twin_opt.step()
    assert_bitwise_equal(params_of(model), [q.detach().to(dtype) for q in twin.parameters()])
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(twin_opt))
    moved = [not torch.equal(p, q.detach().to(dtype)) for p, q in zip(params_of(model), make_model(dtype=dtype).parameters())]
    assert all(moved)


@pytest.mark.parametrize("entry", entry_params())
def test_training_under_bf16_autocast(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(torch.randn(2, 4))
            assert output.dtype == torch.bfloat16  # the matmuls really ran in bf16
            loss = loss_at(model, step)
        loss.float().backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert floating_state_dtypes(opt) == {torch.float32}
    assert non_finite_state(opt) == {}
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    # close to the float32 run (bf16 has 8 bits of mantissa)
    reference = make_model()
    reference_losses = train(reference, entry.make(reference.parameters()), 0, STEPS)
    assert abs(losses[-1] - reference_losses[-1]) < 0.1 * reference_losses[-1], (losses[-1], reference_losses[-1])


def _scaled_training(entry, steps, *, scaler=None, poison=()):
    """Autocast-bf16 training; with ``scaler``, through GradScaler. Gradients of the steps in
    ``poison`` get an Inf after backward. Returns model, optimizer, step() calls, per-step snapshots."""
    model = make_model()
    opt = entry.make(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(len(calls)))
    history = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_at(model, step)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if step in poison:
                model[2].weight.grad[0, 0] = float("inf")
            scale_before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            history.append((scale_before, scaler.get_scale()))
        history.append((params_of(model), optimizer_snapshot(opt)))
    return model, opt, calls, history


@pytest.mark.parametrize("entry", entry_params())
def test_grad_scaler_runs_our_step_and_equals_unscaled_training(entry):
    steps = 7
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_factor=2.0, growth_interval=3)
    model, opt, calls, history = _scaled_training(entry, steps, scaler=scaler)
    assert len(calls) == steps  # scaler.step called our step() every time
    assert scaler.get_scale() == 2.0**14  # grew twice (after steps 3 and 6): it saw no Inf
    reference, reference_opt, _, _ = _scaled_training(entry, steps)
    # power-of-two scaling and unscaling are exact: the runs agree bit for bit
    assert_bitwise_equal(params_of(model), params_of(reference))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(reference_opt))


@pytest.mark.parametrize("entry", entry_params())
def test_grad_scaler_skips_steps_with_inf_gradients(entry):
    steps, poison = 7, (0, 4)  # the very first step (no state yet) and a later one (SOAP: a refresh step)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    model, opt, calls, history = _scaled_training(entry, steps, scaler=scaler, poison=poison)
    assert len(calls) == steps - len(poison)  # our step() never saw the Inf gradients
    snapshots = history[1::2]
    scales = history[0::2]
    for step in poison:
        before = snapshots[step - 1] if step > 0 else (params_of(make_model()), [{} for _ in model.parameters()])
        assert_bitwise_equal(snapshots[step][0], before[0], f"params at skipped step {step}")
        assert_bitwise_equal(snapshots[step][1], before[1], f"state at skipped step {step}")
        assert scales[step][1] == scales[step][0] / 2  # the scaler backed off
    for step in set(range(1, steps)) - set(poison):
        assert not torch.equal(snapshots[step][0][0], snapshots[step - 1][0][0]) or entry.warmup_steps and step == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert non_finite_state(opt) == {}


# ----------------------------------------------------------------------------- configurable state dtype
from registry import OPTIMIZERS, iter_state_tensors  # noqa: E402


def float_state_tensors(state):
    return [t for t in iter_state_tensors(state) if t.is_floating_point() and t.dim() > 0]


@pytest.mark.parametrize("entry", [e for e in OPTIMIZERS if e.skip_reason is None], ids=lambda e: e.name)
def test_state_dtype_option(entry):
    """state_dtype=torch.float64 keeps every floating state tensor in float64 for bf16 parameters, also
    across a state_dict round trip; the default stays float32; anything else is rejected by name."""
    import io

    def run(**kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(6, 5), (5,)]]
        opt = entry.factory(params, **{**entry.hparams, **kw})
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape).to(torch.bfloat16)
            opt.step()
        return params, opt

    params, opt = run(state_dtype=torch.float64)
    dtypes = {t.dtype for p in params for t in float_state_tensors(opt.state[p])}
    assert dtypes == {torch.float64}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh_params, fresh = run(state_dtype=torch.float64)
    fresh.load_state_dict(torch.load(buffer))
    assert {t.dtype for p in fresh_params for t in float_state_tensors(fresh.state[p])} == {torch.float64}
    default_params, default = run()
    assert {t.dtype for p in default_params for t in float_state_tensors(default.state[p])} == {torch.float32}
    with pytest.raises(ValueError, match="state_dtype"):
        entry.factory(params, **{**entry.hparams, "state_dtype": torch.bfloat16})
