"""Generic torch.optim contract tests, run for every optimizer in tests/registry.py."""
from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from registry import (
    assert_bitwise_equal,
    entry_params,
    iter_state_tensors,
    optimizer_snapshot,
)

pytestmark = pytest.mark.parametrize("entry", entry_params())

_GEN = torch.Generator().manual_seed(1234)
X = torch.randn(16, 3, generator=_GEN)
Y = torch.randn(16, 2, generator=_GEN)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    # two same-shaped layers, so that batched code paths get buckets of more than one matrix
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def loss_of(model: nn.Module) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return ((model(X.to(dtype)) - Y.to(dtype)) ** 2).mean()


def train(model: nn.Module, opt, steps: int, sign: float = 1.0) -> None:
    for _ in range(steps):
        opt.zero_grad()
        (sign * loss_of(model)).backward()
        opt.step()


def params_of(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


def grad_sequence(shapes, steps, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run_on_grads(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


# ----------------------------------------------------------------------------- param groups
def test_group_with_lr_zero_does_not_move(entry):
    model = make_model()
    first, second = model[0], model[2]
    opt = entry.make([
        {"params": first.parameters(), "lr": 0.0},
        {"params": second.parameters()},
    ])
    assert opt.param_groups[0]["lr"] == 0.0
    assert opt.param_groups[1]["lr"] == entry.hparams["lr"]
    before = params_of(model)
    train(model, opt, entry.warmup_steps + 3)
    after = params_of(model)
    # first layer frozen bit for bit (it did receive gradients and has state)
    for b, a in zip(before[:2], after[:2]):
        assert_bitwise_equal(a, b)
    assert all(opt.state.get(p) for p in first.parameters())
    # every tensor of the second layer moved
    for b, a in zip(before[2:4], after[2:4]):
        assert not torch.equal(a, b)


def test_param_groups_are_independent(entry):
    """Each group evolves exactly as if it were alone in an optimizer with its own hyperparameters."""
    # same-shaped matrices in both groups: batched paths must not mix groups
    shapes = [(3, 4), (3, 4), (5,), (3, 4)]
    grads = grad_sequence(shapes, entry.warmup_steps + 5)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    override = {"lr": 3 * entry.hparams["lr"], "weight_decay": 0.1}

    joint = [nn.Parameter(t.clone()) for t in init]
    opt = entry.make([{"params": joint[:2]}, {"params": joint[2:], **override}])
    run_on_grads(opt, joint, grads)

    alone_a = [nn.Parameter(t.clone()) for t in init[:2]]
    run_on_grads(entry.make(alone_a), alone_a, [g[:2] for g in grads])
    alone_b = [nn.Parameter(t.clone()) for t in init[2:]]
    run_on_grads(entry.make(alone_b, **override), alone_b, [g[2:] for g in grads])

    for p, q in zip(joint, alone_a + alone_b):
        assert_bitwise_equal(p.detach(), q.detach())
    # and the override did matter
    alone_c = [nn.Parameter(t.clone()) for t in init[2:]]
    run_on_grads(entry.make(alone_c), alone_c, [g[2:] for g in grads])
    for p, q in zip(alone_c, joint[2:]):
        assert not torch.equal(p.detach(), q.detach())


# ----------------------------------------------------------------------------- add_param_group
def test_add_param_group_gets_defaults_and_trains(entry):
    model = make_model()
    opt = entry.make(model[0].parameters())
    opt.add_param_group({"params": model[2].parameters()})
    assert len(opt.param_groups) == 2
    new = opt.param_groups[1]
    for key, default in opt.defaults.items():
        assert key in new, key
        assert new[key] == default, key
    before = params_of(model)
    train(model, opt, entry.warmup_steps + 2)
    after = params_of(model)
    for b, a in zip(before[:4], after[:4]):  # model[4] is not in the optimizer
        assert not torch.equal(a, b)
    for b, a in zip(before[4:], after[4:]):
        assert_bitwise_equal(a, b)
    assert all(opt.state.get(p) for p in model[2].parameters())


def _group_summary(opt):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups]


def test_bad_value_in_add_param_group_rolls_back(entry):
    for kwarg, bad, substring in entry.bad_cases:
        model = make_model()
        opt = entry.make(model[0].parameters())
        groups_before = list(opt.param_groups)
        summary_before = _group_summary(opt)
        with pytest.raises(ValueError, match=re.escape(substring)):
            opt.add_param_group({"params": list(model[2].parameters()), kwarg: bad})
        assert len(opt.param_groups) == 1, (kwarg, bad)
        assert all(a is b for a, b in zip(opt.param_groups, groups_before))
        assert _group_summary(opt) == summary_before
        # the rejected params are not registered anywhere: adding them again works
        opt.add_param_group({"params": list(model[2].parameters())})
        assert len(opt.param_groups) == 2
        before = params_of(model)
        train(model, opt, entry.warmup_steps + 1)
        assert not torch.equal(params_of(model)[2], before[2])


def test_bad_value_in_constructor(entry):
    for kwarg, bad, substring in entry.bad_cases:
        with pytest.raises(ValueError, match=re.escape(substring)):
            entry.make(make_model().parameters(), **{kwarg: bad})


# ----------------------------------------------------------------------------- closure / zero_grad
def test_closure_runs_with_grad_and_returns_loss(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    reference = make_model()
    ref_opt = entry.make(reference.parameters())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        closure.loss = loss
        return loss

    for _ in range(entry.warmup_steps + 3):
        expected = loss_of(model).detach()
        returned = opt.step(closure)
        assert returned is closure.loss
        assert_bitwise_equal(returned.detach(), expected)
        train(reference, ref_opt, 1)
    assert seen == [True] * (entry.warmup_steps + 3)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())
        assert p.grad_fn is None and p.is_leaf


def test_step_without_closure_returns_none(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    loss_of(model).backward()
    assert opt.step() is None


def test_zero_grad(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    loss_of(model).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_of(model).backward()
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()


def test_params_without_grad_are_skipped(entry):
    # same-shaped matrices around the skipped one: a batched path sees its bucket change
    shapes = [(3, 4), (3, 4), (2, 2), (3, 4)]
    skipped = 1
    steps = entry.warmup_steps + 4
    grads = grad_sequence(shapes, steps)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(10 + i)) for i, s in enumerate(shapes)]
    params = [nn.Parameter(t.clone()) for t in init]
    opt = entry.make(params)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if i == skipped else g.clone()
        opt.step()
    assert_bitwise_equal(params[skipped].detach(), init[skipped])
    assert opt.state.get(params[skipped], {}) == {}
    others = [i for i in range(len(shapes)) if i != skipped]
    for i in others:
        assert opt.state.get(params[i])
        assert not torch.equal(params[i].detach(), init[i])
    # the others behave exactly as in an optimizer without the skipped parameter
    alone = [nn.Parameter(init[i].clone()) for i in others]
    run_on_grads(entry.make(alone), alone, [[g[i] for i in others] for g in grads])
    for a, i in zip(alone, others):
        assert_bitwise_equal(a.detach(), params[i].detach())
    # once it gets gradients, the skipped parameter starts training
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    assert opt.state.get(params[skipped])
    assert not torch.equal(params[skipped].detach(), init[skipped])


def test_step_with_no_grads_at_all_is_a_no_op(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    before = params_of(model)
    opt.step()
    assert len(opt.state) == 0
    for a, b in zip(params_of(model), before):
        assert_bitwise_equal(a, b)


# ----------------------------------------------------------------------------- schedulers / hooks
def test_lambda_lr_to_zero_freezes_params(entry):
    k = entry.warmup_steps + 3
    model = make_model()
    opt = entry.make(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < k else 0.0)
    history = []
    for _ in range(k + 3):
        train(model, opt, 1)
        sched.step()
        history.append(params_of(model))
    assert opt.param_groups[0]["lr"] == 0.0
    # moving before step k (after warm-up) ...
    for a, b in zip(history[k - 2], history[k - 1]):
        assert not torch.equal(a, b)
    # ... and frozen from then on
    for later in history[k:]:
        for a, b in zip(later, history[k - 1]):
            assert_bitwise_equal(a, b)
    # the first k steps equal a plain k-step run
    plain = make_model()
    train(plain, entry.make(plain.parameters()), k)
    for a, b in zip(params_of(plain), history[k - 1]):
        assert_bitwise_equal(a, b)


def test_step_lr_equals_manual_lr_changes(entry):
    steps = entry.warmup_steps + 4
    lr0 = entry.hparams["lr"]
    model = make_model()
    opt = entry.make(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        train(model, opt, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == lr0 * 0.5**steps

    manual = make_model()
    manual_opt = entry.make(manual.parameters())
    constant = make_model()
    constant_opt = entry.make(constant.parameters())
    for t in range(steps):
        manual_opt.param_groups[0]["lr"] = lr0 * 0.5**t
        train(manual, manual_opt, 1)
        train(constant, constant_opt, 1)
    for a, b, c in zip(params_of(model), params_of(manual), params_of(constant)):
        assert_bitwise_equal(a, b)  # halving is exact, so the lr values are identical
        assert not torch.equal(a, c)


def test_step_hooks_called_once_per_step(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    events = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", o)))
    train(model, opt, 3)
    assert [e[0] for e in events] == ["pre", "post"] * 3
    assert all(o is opt for _, o in events)
    pre.remove()
    post.remove()
    train(model, opt, 1)
    assert len(events) == 6


# ----------------------------------------------------------------------------- maximize / tensor lr
def test_maximize_equals_minimizing_negated_loss(entry):
    steps = entry.warmup_steps + 5
    maxi = make_model()
    maxi_opt = entry.make(maxi.parameters(), maximize=True)
    initial_loss = loss_of(maxi).item()
    train(maxi, maxi_opt, steps, sign=1.0)
    neg = make_model()
    neg_opt = entry.make(neg.parameters())
    train(neg, neg_opt, steps, sign=-1.0)
    for p, q in zip(maxi.parameters(), neg.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())
    assert_bitwise_equal(optimizer_snapshot(maxi_opt), optimizer_snapshot(neg_opt))
    assert loss_of(maxi).item() > initial_loss
    mini = make_model()
    train(mini, entry.make(mini.parameters()), steps)
    assert loss_of(mini).item() < initial_loss


@pytest.mark.parametrize(
    "lr,tensor_lr",
    [
        (0.01, lambda: torch.tensor(0.01, dtype=torch.float64)),
        (2.0**-7, lambda: torch.tensor(2.0**-7)),
    ],
    ids=["f64-scalar", "f32-scalar"],
)
def test_tensor_lr_equals_float_lr(entry, lr, tensor_lr):
    steps = entry.warmup_steps + 4
    a = make_model()
    train(a, entry.make(a.parameters(), lr=lr), steps)
    b = make_model()
    train(b, entry.make(b.parameters(), lr=tensor_lr()), steps)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())
    assert not torch.equal(params_of(a)[0], params_of(make_model())[0])


def test_tensor_hyperparameters_other_than_one_element_are_rejected(entry):
    """Real-valued hyperparameters are numbers or one-element tensors (0-d, [1], [1, 1], as torch.optim
    takes them); a tensor of several elements is a ValueError naming it, at construction and when a
    scheduler or the user sets it before a step (nothing modified)."""
    model = make_model()
    with pytest.raises(ValueError, match="lr must be a Python number or a one-element"):
        entry.make(model.parameters(), lr=torch.tensor([0.01, 0.02]))
    opt = entry.make(model.parameters())
    train(model, opt, entry.warmup_steps + 1)
    before = optimizer_snapshot(opt), [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.02])
    with pytest.raises(ValueError, match="lr must be a Python number or a one-element"):
        train(model, opt, 1)
    assert_bitwise_equal(optimizer_snapshot(opt), before[0])
    assert_bitwise_equal([p.detach() for p in model.parameters()], before[1])


# ----------------------------------------------------------------------------- state_dict
def _round_trip(entry, dtype, steps_before=5, steps_after=5):
    model = make_model(dtype=dtype)
    opt = entry.make(model.parameters())
    train(model, opt, steps_before)
    saved_state = optimizer_snapshot(opt)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, steps_after)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh = make_model(seed=99, dtype=dtype)
    fresh.load_state_dict(checkpoint["model"])
    # constructed with another lr: the loaded param_groups must win
    fresh_opt = entry.make(fresh.parameters(), lr=7 * entry.hparams["lr"])
    fresh_opt.load_state_dict(checkpoint["opt"])
    assert fresh_opt.param_groups[0]["lr"] == entry.hparams["lr"]
    # loaded state is exactly what was saved (no rounding through the parameter dtype)
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), saved_state)
    loaded_state = optimizer_snapshot(fresh_opt)
    train(fresh, fresh_opt, steps_after)
    return model, opt, fresh, fresh_opt, loaded_state


def test_state_dict_round_trip_is_bitwise(entry):
    model, opt, fresh, fresh_opt, _ = _round_trip(entry, torch.float32)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert_bitwise_equal(q.detach(), p.detach())
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), optimizer_snapshot(opt))
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert strip(fresh_opt.param_groups) == strip(opt.param_groups)


def _assert_state_dtype(entry, opt, expected):
    checked = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            for key in entry.float32_state_keys:
                assert key in state, key
                for t in iter_state_tensors(state[key]):
                    assert t.dtype == expected, (key, tuple(p.shape), t.dtype)
                    checked += 1
    assert checked >= len(entry.float32_state_keys) * 4 or not entry.float32_state_keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(entry, dtype):
    model, opt, fresh, fresh_opt, loaded = _round_trip(entry, dtype, steps_before=4, steps_after=3)
    for m in (model, fresh):
        assert all(p.dtype == dtype for p in m.parameters())
    _assert_state_dtype(entry, opt, torch.float32)
    _assert_state_dtype(entry, fresh_opt, torch.float32)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert_bitwise_equal(q.detach(), p.detach())
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), optimizer_snapshot(opt))
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_float64_params_keep_float64_state(entry):
    model, opt, fresh, fresh_opt, _ = _round_trip(entry, torch.float64, steps_before=3, steps_after=2)
    _assert_state_dtype(entry, opt, torch.float64)
    _assert_state_dtype(entry, fresh_opt, torch.float64)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert_bitwise_equal(q.detach(), p.detach())


def test_load_state_dict_does_not_alias_the_source(entry):
    """Loading a live optimizer's state_dict (no serialization) copies it: training one leaves the other."""
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 4)
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict())
    other_opt = entry.make(other.parameters())
    other_opt.load_state_dict(opt.state_dict())
    source_state = optimizer_snapshot(opt)
    source_params = params_of(model)
    train(other, other_opt, 3)
    assert_bitwise_equal(optimizer_snapshot(opt), source_state)
    assert_bitwise_equal(params_of(model), source_params)
    # and the source, trained the same way, reaches the same point
    train(model, opt, 3)
    assert_bitwise_equal(params_of(model), params_of(other))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(other_opt))
