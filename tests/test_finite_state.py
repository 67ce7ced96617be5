"""No state is ever non-finite: tiny and saturating Shampoo factors, Adafactor at extreme scales, and
first-moment EMAs of near-max gradients of alternating sign."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo
from soap_optim.adam import adam_
from soap_optim.eigenbasis import halve_saturating_sums_
from soap_optim.moment_math import first_moment_ema_, foreach_first_moment_ema_
from soap_optim.shampoo import inverse_root

F32_MAX = torch.finfo(torch.float32).max


def _all_finite(optimizer, param) -> bool:
    tensors = [param]
    for value in optimizer.state[param].values():
        items = value if isinstance(value, list) else [value]
        tensors += [t for t in items if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _spd(dim, eigenvalues, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (vectors @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ vectors.T).to(dtype)


# ----------------------------------------------------------------- Shampoo: tiny factors
@pytest.mark.parametrize("dtype, powers", [(torch.float32, (-110, -60, 0, 60, 110)), (torch.float64, (-900, 0, 900))])
@pytest.mark.parametrize("exponent", [0.25, 0.5])
def test_inverse_root_is_scale_equivariant_down_to_the_smallest_normal_factor(dtype, powers, exponent):
    # root(2^k F) = 2^(-k p) root(F): F scaled by a power of two is decomposed exactly alike, so the two
    # differ only by how the scale enters the eigenvalues, exp(-p (log v + k log 2)) in float64: an error
    # of a few ulps of the logarithm, |k p log 2| ulps relative after exp (the cast to float32 hides it).
    factor = _spd(5, [10.0, 3.0, 1.0, 0.1, 0.01], seed=3, dtype=dtype)
    reference = inverse_root(factor, exponent, 1e-6)
    ulp = torch.finfo(dtype).eps
    for k in powers:
        scaled = inverse_root(factor * 2.0**k, exponent, 1e-6)
        expected = reference * 2.0 ** (-k * exponent)
        rounding = ulp * (8 + 4 * abs(k * exponent * math.log(2)))
        assert ((scaled - expected).abs() <= rounding * expected.abs().max()).all(), k


def test_inverse_root_of_a_subnormal_factor_is_the_identity():
    factor = _spd(4, [4.0, 2.0, 1.0, 0.5], seed=1, dtype=torch.float32) * 1e-39  # entries below float32 tiny
    assert torch.equal(inverse_root(factor, 0.25, 1e-6), torch.eye(4))


def test_inverse_root_of_a_singular_factor_without_damping_is_capped():
    # matrix_eps=0 and a zero eigenvalue: (0)^(-p) is capped at sqrt(max); the other eigenvalue is exact
    root = inverse_root(torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64)), 0.5, matrix_eps=0.0)
    cap = math.sqrt(torch.finfo(torch.float64).max)
    assert root[0, 0].item() == pytest.approx(0.5, rel=1e-15)
    assert root[1, 1].item() == pytest.approx(cap, rel=1e-12) and root[0, 1].item() == 0.0


def test_shampoo_layer_that_stops_receiving_gradient_stays_finite():
    # 20 real steps, then zero gradients: the EMA factors decay geometrically (0.5^t) through the subnormals
    # to zero within ~200 steps, crossing every regime of the old failure (NaN once they were subnormal).
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = Shampoo([w], lr=1e-2, shampoo_beta=0.5, precondition_frequency=1, start_preconditioning_step=1)
    for t in range(250):
        w.grad = torch.randn(8, 4) if t < 20 else torch.zeros(8, 4)
        opt.step()
        assert _all_finite(opt, w), t
    assert opt.state[w]["factors"][0].abs().max().item() < torch.finfo(torch.float32).tiny  # it did decay away


# ----------------------------------------------------------------- Shampoo: running sums near the max
def test_halving_keeps_a_running_sum_below_the_limit_and_leaves_others_bitwise():
    big = torch.diag(torch.tensor([0.75 * F32_MAX, 1.0]))
    small = torch.randn(3, 3)
    small = small @ small.T
    before = small.clone()
    halve_saturating_sums_([big, None, small])
    assert big[0, 0].item() == pytest.approx(0.375 * F32_MAX, rel=1e-7) and big[1, 1].item() == 0.5
    assert torch.equal(small, before)


def test_shampoo_running_sum_of_huge_gradients_stays_finite():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = Shampoo([w], lr=1e-2, shampoo_beta=1.0, precondition_frequency=1, start_preconditioning_step=1)
    limit = 0.9 * math.sqrt(F32_MAX / 4)  # Gram matrices just below the overflow guard: ~max/4 per step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "factor is not finite" warning either
        for _ in range(40):
            g = torch.randn(8, 4)
            w.grad = g * (limit / g.norm())
            opt.step()
            assert _all_finite(opt, w)


# ----------------------------------------------------------------- Adafactor at extreme scales
def _adafactor_steps(scale, cls=Adafactor, **hyper):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    base[1] = 0.0
    base[:, 3] = 0.0
    p = torch.nn.Parameter(torch.ones(6, 5))
    opt = cls([p], lr=1e-2, **hyper)
    for t in range(3):
        p.grad = base * (scale * (1 + t))
        opt.step()
    return p.detach() - 1, opt, p


@pytest.mark.parametrize("scale", [1e10, 1e15, 1e18])
def test_adafactor_step_is_scale_invariant_with_zero_rows(scale):
    # U = G / sqrt(V) does not depend on the gradients' scale (eps = 1e-30 is negligible at scale 1), so
    # the steps at 1e10..1e18 are the steps at scale 1, computed in float32: a few float32 roundings.
    # At 1e15 the float32 reconstruction used to underflow to 0 on the zero row, and 0/0 was NaN.
    expected, _, _ = _adafactor_steps(1.0)
    got, opt, p = _adafactor_steps(scale)
    assert _all_finite(opt, p)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2 * 1e-5)
    assert torch.equal(got[1], torch.zeros(5)) and torch.equal(got[:, 3], torch.zeros(6))  # rows torch leaves too


def test_adafactor_zero_rows_are_left_alone_as_torch_does():
    got, _, _ = _adafactor_steps(1.0)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(6, 5))
    reference = torch.optim.Adafactor([p], lr=1e-2)
    base = torch.randn(6, 5)
    base[1] = 0.0
    base[:, 3] = 0.0
    for t in range(3):
        p.grad = base * (1 + t)
        reference.step()
    moved = (p.detach() - 1) != 0
    assert torch.equal(moved, got != 0)


@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30, 1e37])
@pytest.mark.parametrize("cls, hyper", [(Adafactor, {}), (Adafactor, {"beta1": 0.9}), (SOAP, {"factorized": True})])
def test_factored_statistics_stay_finite_where_they_saturate(scale, cls, hyper):
    """Adafactor takes any finite gradient (its update is RMS-clipped); SOAP refuses a gradient whose norm
    is above sqrt(max)/2 (its rotated squares could overflow), so it is run skipping those steps."""
    if cls is SOAP:
        hyper = {**hyper, "skip_nonfinite_grads": True}
        with pytest.warns(RuntimeWarning, match="gradient too large"):
            got, opt, p = _adafactor_steps(scale, cls, **hyper)
        assert opt.param_groups[0]["skipped_steps"] == 3 and not opt.state[p] and torch.equal(got, torch.zeros(6, 5))
        return
    got, opt, p = _adafactor_steps(scale, cls, **hyper)
    assert _all_finite(opt, p)
    assert torch.equal(got[1], torch.zeros(5)) or cls is SOAP  # SOAP's rotation mixes rows


# ----------------------------------------------------------------- first moments near the max
def test_first_moment_ema_of_alternating_near_max_entries_is_the_convex_combination():
    m = torch.tensor([-F32_MAX, F32_MAX, -0.5 * F32_MAX])
    g = torch.tensor([F32_MAX, -F32_MAX, F32_MAX])
    assert not torch.isfinite(m.clone().lerp_(g, 0.1)).all()  # torch's lerp_ overflows here
    expected = (0.9 * m.double() + 0.1 * g.double()).float()
    torch.testing.assert_close(first_moment_ema_(m.clone(), g, 0.9), expected, rtol=2**-22, atol=0)
    ms = [m.clone()]
    foreach_first_moment_ema_(ms, [g], 0.9)
    assert torch.equal(ms[0], first_moment_ema_(m.clone(), g, 0.9))


def _alternating_near_max(optimizer_factory, shape=(3, 2), steps=4):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = optimizer_factory(p)
    for t in range(steps):
        p.grad = torch.full(shape, F32_MAX * (-1) ** t)
        opt.step()
    return opt, p


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: Shampoo([p], lr=1e-3),
        lambda p: Shampoo([p], lr=1e-3, grafting="sgd"),
        lambda p: Adafactor([p], lr=1e-3, beta1=0.5),
        lambda p: SOAP([p], lr=1e-3, foreach=False, max_precond_dim=1),
        lambda p: SOAP([p], lr=1e-3, max_precond_dim=1),
    ],
)
def test_first_moments_stay_finite_for_alternating_near_max_gradients(factory):
    """Optimizers that square the gradient (SOAP, Shampoo's Adam graft) refuse norms above sqrt(max)/2:
    nothing is modified; the others take the steps and stay finite."""
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = factory(p)
    if opt._max_grad_norm(p.shape, opt.param_groups[0], torch.float32) < F32_MAX:
        p.grad = torch.full((3, 2), F32_MAX)
        with pytest.raises(FloatingPointError, match="gradient too large"):
            opt.step()
        assert not opt.state[p] and not p.detach().any()
        return
    opt, p = _alternating_near_max(factory)
    assert _all_finite(opt, p)


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_guarded_first_moment_stays_finite_where_torch_adamw_does_not(foreach):
    torch_opt, torch_p = _alternating_near_max(lambda p: torch.optim.AdamW([p], lr=1e-3, foreach=foreach))
    assert not torch.isfinite(torch_opt.state[torch_p]["exp_avg"]).all()  # the control: torch turns NaN
    p = torch.zeros(3, 2)
    m, v, steps = torch.zeros(3, 2), torch.zeros(3, 2), [torch.tensor(0.0)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
                 amsgrad=False, maximize=False, guard_overflow=True)
    for t in range(4):
        adam_([p], [torch.full((3, 2), F32_MAX * (-1) ** t)], [m], [v], [], steps, foreach=foreach, **hyper)
    assert torch.isfinite(m).all() and torch.isfinite(p).all()
    expected = torch.zeros((), dtype=torch.float64)
    for t in range(4):
        expected = 0.9 * expected + 0.1 * (F32_MAX * (-1) ** t)
    torch.testing.assert_close(m, torch.full((3, 2), expected.item()), rtol=1e-6, atol=0)
