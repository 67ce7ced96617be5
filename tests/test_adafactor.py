"""Adafactor: factored moments in closed form, the update rule, and the SOAP paper's identity."""
from __future__ import annotations

import copy

import pytest
import torch

from soap_optim.adafactor import Adafactor
from soap_optim.moment_math import factored_second_moment, factored_shape
from soap_optim.shampoo import Shampoo

F64 = torch.float64


def _grads(n, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(n)]


def _weights(steps, decay):
    """Weight of step s in the moment after ``steps`` steps: (1 - b_s) prod_{u > s} b_u, b_t = 1 - t^decay."""
    betas = [1 - t**decay for t in range(1, steps + 1)]
    weights = []
    for s in range(steps):
        w = 1 - betas[s]
        for b in betas[s + 1:]:
            w *= b
        weights.append(w)
    return weights


def _run(param, grads, **hyper):
    opt = Adafactor([param], **hyper)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("steps,decay", [(1, -0.8), (5, -0.8), (7, -1.0), (4, -0.5)])
def test_factored_moments_in_closed_form(steps, decay):
    eps = 1e-3  # large enough to be visible in the sums
    grads = _grads(steps, (5, 3))
    w = torch.zeros(5, 3, dtype=F64, requires_grad=True)
    state = _run(w, grads, lr=0.0, beta2_decay=decay, eps=eps).state[w]
    weights = _weights(steps, decay)
    if decay == -1.0:  # b_t = 1 - 1/t: the moments are plain means
        assert weights == pytest.approx([1 / steps] * steps)
    rows = sum(wt * (g.square() + eps).sum(dim=1) for wt, g in zip(weights, grads))
    cols = sum(wt * (g.square() + eps).sum(dim=0) for wt, g in zip(weights, grads))
    torch.testing.assert_close(state["exp_avg_sq_row"], rows, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(state["exp_avg_sq_col"], cols, atol=1e-13, rtol=1e-13)
    assert set(state) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert state["step"].item() == steps


def test_full_second_moment_for_vectors_and_scalars():
    steps, decay, eps = 6, -0.8, 1e-3
    for shape in [(7,), ()]:
        grads = _grads(steps, shape, seed=1)
        w = torch.zeros(shape, dtype=F64, requires_grad=True)
        state = _run(w, grads, lr=0.0, eps=eps).state[w]
        expected = sum(wt * (g.square() + eps) for wt, g in zip(_weights(steps, decay), grads))
        torch.testing.assert_close(state["exp_avg_sq"], expected, atol=1e-13, rtol=1e-13)


def test_first_update_in_closed_form():
    """After one step b_1 = 0: r = (G^2 + eps) 1, c = 1^T (G^2 + eps), V = r c^T / 1^T r,
    U = G / sqrt(V), clipped to RMS <= d, theta <- theta (1 - lr wd) - lr U."""
    lr, wd, eps, d = 0.1, 0.5, 1e-30, 1.0
    (g,) = _grads(1, (4, 6), seed=2)
    g[0] *= 30  # one loud row: RMS(U) > 1, so clipping is active
    theta0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    w = theta0.clone().requires_grad_()
    _run(w, [g], lr=lr, weight_decay=wd, eps=eps, d=d)
    squared = g.square() + eps
    v = torch.outer(squared.sum(1), squared.sum(0)) / squared.sum()
    u = g / v.sqrt()
    rms = u.square().mean().sqrt()
    assert rms > 1
    expected = theta0 * (1 - lr * wd) - lr * u / max(1.0, rms.item() / d)
    torch.testing.assert_close(w.detach(), expected, atol=1e-14, rtol=0)


def test_several_updates_with_momentum_in_closed_form():
    lr, beta1, d, steps = 0.05, 0.9, 0.5, 5
    grads = _grads(steps, (3, 4), seed=4)
    w = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    opt = _run(w, grads, lr=lr, beta1=beta1, d=d)
    rows = torch.zeros(3, dtype=F64)
    cols = torch.zeros(4, dtype=F64)
    m = torch.zeros(3, 4, dtype=F64)
    theta = torch.zeros(3, 4, dtype=F64)
    for t, g in enumerate(grads, start=1):
        b = 1 - t**-0.8
        rows = b * rows + (1 - b) * (g.square() + 1e-30).sum(1)
        cols = b * cols + (1 - b) * (g.square() + 1e-30).sum(0)
        u = g / (torch.outer(rows, cols) / rows.sum()).sqrt()
        u = u / max(1.0, u.square().mean().sqrt().item() / d)
        m = beta1 * m + (1 - beta1) * u
        theta = theta - lr * m
    torch.testing.assert_close(w.detach(), theta, atol=1e-14, rtol=0)
    torch.testing.assert_close(opt.state[w]["exp_avg"], m, atol=1e-14, rtol=0)


def test_clipping_caps_the_update_rms_at_d():
    (g,) = _grads(1, (6, 5), seed=5)
    g[:, 0] *= 100
    w = torch.zeros(6, 5, dtype=F64, requires_grad=True)
    _run(w, [g], lr=1.0, d=0.25)
    assert w.detach().square().mean().sqrt().item() == pytest.approx(0.25, rel=1e-12)


def test_higher_dimensional_tensors_are_factored_as_first_axis_by_the_rest():
    assert factored_shape((8, 3, 5, 5)) == (8, 75)
    assert factored_shape((4, 6)) == (4, 6)
    assert factored_shape((7,)) is None and factored_shape(()) is None
    grads = _grads(3, (2, 3, 4), seed=6)
    w = torch.zeros(2, 3, 4, dtype=F64, requires_grad=True)
    state = _run(w, grads).state[w]
    assert state["exp_avg_sq_row"].shape == (2,) and state["exp_avg_sq_col"].shape == (12,)


def test_identity_behind_soap_adafactor_in_shampoos_eigenbasis_is_shampoo_with_power_half():
    r"""The SOAP paper's claim (Vyas et al. 2024, Sec. 3), checked numerically.

    Let G be m x n gradients, L = E[G G^T] = Q_L diag(lambda) Q_L^T and R = E[G^T G] =
    Q_R diag(mu) Q_R^T. Note tr L = tr R = E||G||_F^2.

    * Idealized Shampoo with power 1/2 and the paper's trace normalization preconditions with
      H = (L (x) R) / tr(L), H^{-1/2} vec(X) = sqrt(tr L) vec(L^{-1/2} X R^{-1/2}). In the rotated
      coordinates X~ = Q_L^T X Q_R this is diagonal:
          (Q_L^T L^{-1/2} X R^{-1/2} Q_R)_{ij} = X~_{ij} / sqrt(lambda_i mu_j).
    * Idealized Adafactor on the rotated gradients G~ = Q_L^T G Q_R keeps the row and column sums of
      E[G~^2]: row_i = (Q_L^T L Q_L)_{ii} = lambda_i, col_j = mu_j, total = tr L, so
          V_{ij} = row_i col_j / sum(row) = lambda_i mu_j / tr L,  and it scales X~_{ij} by 1/sqrt(V_{ij}).

    Both scale coordinate (i, j) by c / sqrt(lambda_i mu_j): the per-coordinate multipliers agree up to
    one global constant (exactly equal with the trace normalization).

    Here both sides come from the optimizers themselves: Shampoo's roots (shampoo_beta=1 sums N
    gradients, so its factors are N L and N R, and matrix_eps=0) and Adafactor's row/column state
    (beta2_decay=-1 makes its moments exact means).
    """
    m, n, count = 6, 4, 40
    gen = torch.Generator().manual_seed(0)
    mix_left = torch.randn(m, m, generator=gen, dtype=F64)
    mix_right = torch.randn(n, n, generator=gen, dtype=F64)
    grads = [mix_left @ torch.randn(m, n, generator=gen, dtype=F64) @ mix_right for _ in range(count)]
    left = sum(g @ g.T for g in grads) / count
    right = sum(g.T @ g for g in grads) / count
    q_left = torch.linalg.eigh(left)[1]
    q_right = torch.linalg.eigh(right)[1]

    w = torch.zeros(m, n, dtype=F64, requires_grad=True)
    shampoo = Shampoo([w], lr=0.0, betas=(0.0, 0.999), shampoo_beta=1.0, matrix_eps=0.0, exponent_override=0.5,
                      grafting="none", weight_decay=0.0, start_preconditioning_step=count,
                      precondition_frequency=10 * count)
    for g in grads:
        w.grad = g.clone()
        shampoo.step()
    root_left, root_right = shampoo.state[w]["roots"]
    # Shampoo's per-coordinate multiplier in the eigenbasis, read off its action on unit matrices there.
    shampoo_scale = torch.empty(m, n, dtype=F64)
    for i in range(m):
        for j in range(n):
            unit = torch.zeros(m, n, dtype=F64)
            unit[i, j] = 1.0
            image = q_left.T @ (root_left @ (q_left @ unit @ q_right.T) @ root_right) @ q_right
            shampoo_scale[i, j] = image[i, j]
            # ... and it is diagonal there: no other coordinate is touched.
            off = image.clone()
            off[i, j] = 0.0
            assert off.abs().max().item() < 1e-9 * image[i, j].abs().item()

    v = torch.zeros(m, n, dtype=F64, requires_grad=True)
    adafactor = Adafactor([v], lr=0.0, beta2_decay=-1.0, eps=1e-300)
    for g in grads:
        v.grad = q_left.T @ g @ q_right
        adafactor.step()
    state = adafactor.state[v]
    adafactor_scale = factored_second_moment(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).rsqrt()

    ratio = shampoo_scale / adafactor_scale
    # The constant: Shampoo summed N gradients (factor N) and has no trace normalization (sqrt(tr L)).
    expected = 1.0 / (count * torch.trace(left).sqrt())
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected.item()), atol=0, rtol=1e-9)
    # The multipliers really do differ from coordinate to coordinate (the check is not vacuous).
    assert adafactor_scale.max() / adafactor_scale.min() > 10


def test_low_precision_params_keep_float32_state():
    w = torch.randn(5, 4).to(torch.bfloat16).requires_grad_()
    b = torch.randn(4).to(torch.float16).requires_grad_()
    opt = Adafactor([w, b], lr=1e-2, beta1=0.9)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        w.grad = torch.randn(5, 4, generator=gen).to(torch.bfloat16)
        b.grad = torch.randn(4, generator=gen).to(torch.float16)
        opt.step()
    for p in (w, b):
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
        assert bool(torch.isfinite(p).all())


def test_empty_parameters_are_fine():
    params = [torch.zeros(0, 3, requires_grad=True), torch.zeros(3, 0, requires_grad=True)]
    opt = Adafactor(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


def test_state_dict_round_trip_continues_identically():
    shapes = [(5, 4), (3,), (2, 3, 4)]
    params = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes]
    opt = Adafactor(params, lr=1e-2, beta1=0.9, weight_decay=0.1)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(step))
        opt.step()
    clone_params = [p.detach().clone().requires_grad_() for p in params]
    clone = Adafactor(clone_params, lr=1e-2, beta1=0.9, weight_decay=0.1)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        for p, q in zip(params, clone_params):
            g = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
    for p, q in zip(params, clone_params):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_wrong_shapes():
    w = torch.zeros(5, 4, requires_grad=True)
    opt = Adafactor([w])
    w.grad = torch.ones(5, 4)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["exp_avg_sq_row"] = torch.zeros(4)
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        Adafactor([torch.zeros(5, 4, requires_grad=True)]).load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(lr=-1.0), "-1.0"),
        (dict(beta1=1.0), "1.0"),
        (dict(beta1=-0.1), "-0.1"),
        (dict(beta2_decay=0.5), "0.5"),
        (dict(beta2_decay="fast"), "fast"),
        (dict(eps=0.0), "0.0"),
        (dict(d=-1.0), "-1.0"),
        (dict(weight_decay=-0.1), "-0.1"),
        (dict(maximize="yes"), "yes"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=f".*{needle}"):
        Adafactor([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_maximize_flips_the_step():
    (g,) = _grads(1, (3, 3), seed=9)
    a = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    b = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    _run(a, [g], lr=0.1)
    _run(b, [-g], lr=0.1, maximize=True)
    assert torch.equal(a, b)
