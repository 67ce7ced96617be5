"""Adam / AdamW: parity with torch.optim to float64 precision, both implementations."""
from __future__ import annotations

import copy

import pytest
import torch

from soap_optim.adam import Adam, AdamW

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (1, 1), (0, 3)]
N_STEPS = 20


def _params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in SHAPES]


def _grads(step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES]


def _run_pair(ours_cls, torch_cls, steps=N_STEPS, foreach=None, **hyper):
    ours_params, torch_params = _params(), _params()
    ours = ours_cls(ours_params, foreach=foreach, **hyper)
    reference = torch_cls(torch_params, foreach=False, **hyper)
    for step in range(steps):
        for a, b, g in zip(ours_params, torch_params, _grads(step)):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    return ours, ours_params, reference, torch_params


def _max_abs_difference(ours, ours_params, reference, torch_params):
    worst = 0.0
    for a, b in zip(ours_params, torch_params):
        assert a.dtype == b.dtype
        if a.numel():
            worst = max(worst, (a - b).abs().max().item())
        ours_state, torch_state = ours.state[a], reference.state[b]
        assert set(ours_state) == set(torch_state)
        for key, value in torch_state.items():
            mine = ours_state[key]
            # step: float64 here (exact to 2^53), float32 in torch.optim (exact to 2^24); same value
            assert mine.shape == value.shape and (mine.dtype == value.dtype or key == "step"), key
            if value.numel():
                worst = max(worst, (mine - value).abs().max().item())
    return worst


CASES = [
    (AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (AdamW, torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1, maximize=True)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.2, amsgrad=True)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    (Adam, torch.optim.Adam, dict(lr=2e-2, betas=(0.0, 0.99), weight_decay=0.05, amsgrad=True)),
]


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("ours_cls,torch_cls,hyper", CASES)
def test_matches_torch_in_float64(ours_cls, torch_cls, hyper, foreach):
    worst = _max_abs_difference(*_run_pair(ours_cls, torch_cls, foreach=foreach, **hyper))
    assert worst <= 1e-12, worst


def test_foreach_path_is_bitwise_torch():
    # The batched path performs torch's single-tensor operations in the same order.
    worst = _max_abs_difference(*_run_pair(AdamW, torch.optim.AdamW, lr=1e-2, weight_decay=0.1))
    assert worst == 0.0


def test_defaults_match_torch():
    params = _params()
    for ours, theirs in ((Adam(params), torch.optim.Adam(params)), (AdamW(params), torch.optim.AdamW(params))):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            assert ours.defaults[key] == theirs.defaults[key], key


def test_param_groups_keep_their_own_hyperparameters():
    ours_params, torch_params = _params(), _params()
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:3], "lr": 1e-2, "weight_decay": 0.3},
        {"params": ps[3:], "lr": 5e-2, "betas": (0.8, 0.95)},
    ]
    ours, reference = AdamW(groups(ours_params)), torch.optim.AdamW(groups(torch_params), foreach=False)
    for step in range(5):
        for a, b, g in zip(ours_params, torch_params, _grads(step)):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    assert _max_abs_difference(ours, ours_params, reference, torch_params) <= 1e-12


def test_params_without_grad_are_skipped():
    params = _params()
    opt = AdamW(params, lr=1e-2)
    params[0].grad = torch.ones_like(params[0])
    before = [p.detach().clone() for p in params]
    opt.step()
    assert not torch.equal(params[0], before[0])
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p, b) and not opt.state[p]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_float32_state(dtype):
    start = torch.randn(4, 3, generator=torch.Generator().manual_seed(11))
    low = [start.to(dtype).requires_grad_()]
    high = [low[0].detach().float().requires_grad_()]
    lr, steps = 1e-2, 3
    ours, reference = AdamW(low, lr=lr), AdamW(high, lr=lr)
    for step in range(steps):
        g = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        low[0].grad, high[0].grad = g.to(dtype), g.to(dtype).float()
        ours.step()
        reference.step()
    state = ours.state[low[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert low[0].dtype == dtype
    # Moments are computed from the same gradients in float32; only the parameter is rounded: once per step
    # to the nearest (at most half an ulp, eps/2 relative), and Adam's step (at most ~lr) does not depend on
    # the parameter except through weight decay (lr * 1e-2 times the difference). So the difference is at
    # most steps half-ulps of the largest magnitude the parameter had (the start is the same in both).
    torch.testing.assert_close(state["exp_avg"], reference.state[high[0]]["exp_avg"])
    largest = high[0].detach().abs() + steps * lr
    bound = steps * torch.finfo(dtype).eps / 2 * largest * 1.01
    assert bool(((low[0].float() - high[0]).abs() <= bound).all()), (low[0].float() - high[0]).abs() / largest
    assert not torch.equal(low[0].float(), high[0])  # the rounding is there to bound


def test_closure_runs_with_grad_enabled():
    w = torch.zeros(3, requires_grad=True)
    opt = Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((w - 1) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3.0)
    assert torch.all(w > 0)


def test_state_dict_round_trip_continues_identically():
    params = _params()
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for step in range(3):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
    clone_params = [p.detach().clone().requires_grad_() for p in params]
    clone = AdamW(clone_params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        for p, q, g in zip(params, clone_params, _grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
    for p, q in zip(params, clone_params):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_wrong_shapes():
    params = [torch.zeros(3, 2, requires_grad=True)]
    opt = Adam(params)
    params[0].grad = torch.ones(3, 2)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg_sq"] = torch.zeros(2, 3)
    other = Adam([torch.zeros(3, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="exp_avg_sq"):
        other.load_state_dict(saved)
    assert not other.state


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(lr=-1e-3), "-0.001"),
        (dict(lr=float("nan")), "nan"),
        (dict(betas=(1.0, 0.999)), "1.0"),
        (dict(betas=(0.9, -0.1)), "-0.1"),
        (dict(betas=0.9), "0.9"),
        (dict(eps=-1e-8), "-1e-08"),
        (dict(weight_decay=-0.5), "-0.5"),
        (dict(amsgrad="yes"), "yes"),
        (dict(foreach="fast"), "fast"),
        (dict(maximize=1), "1"),
    ],
)
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_bad_hyperparameters_raise_value_error_naming_the_value(cls, kwargs, needle):
    with pytest.raises(ValueError, match=f".*{needle}"):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_is_rolled_back():
    opt = AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="-2"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -2.0})
    assert len(opt.param_groups) == 1
