"""KL factor updates (soap_optim.eigenbasis.kl; SOAP and Shampoo with ``factor_update="kl"``).

The core's update against the closed form in float64 (a matrix, and a 3-D tensor through explicit Kronecker
products), the first update, KL-SOAP and KL-Shampoo trajectories against float64 re-implementations written
here, batched == one-parameter, bitwise resume, checkpoints without eigenvalues, bad values, finite state.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from soap_optim import SOAP, Shampoo
from soap_optim.eigenbasis import initial_basis
from soap_optim.eigenbasis.kl import (
    EIGENVALUE_FLOOR,
    eigenbasis_whiteners,
    estimates_of,
    initial_kl_factors_,
    kl_factor_ema_,
)
from soap_optim.kernels import reference

from fused_twins import assert_fused_equals_pytorch

F64 = torch.float64


def _spd(d, generator, scale=1.0):
    a = torch.randn(d, d, generator=generator, dtype=F64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=F64))


def _clamped_inverse(basis, values):
    """Q diag(max(lambda, floor * max lambda))^-1 Q^T in float64: the inverse the update whitens with."""
    values = values.clamp_min(EIGENVALUE_FLOOR * values.max())
    return basis @ torch.diag(1 / values) @ basis.T


def _unfold(x, axis):
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _kron(matrices):
    out = torch.ones(1, 1, dtype=F64)
    for m in matrices:
        out = torch.kron(out, m)
    return out


def test_matrix_update_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    m, n, beta = 5, 7, 0.9
    left, right = _spd(m, g), _spd(n, g)
    grad = torch.randn(m, n, generator=g, dtype=F64)
    # estimates from a perturbed basis: the update must use (Q, lambda), not the factor itself
    bases = [initial_basis(_spd(m, g)), initial_basis(_spd(n, g))]
    factors = [left.clone(), right.clone()]
    eigenvalues = estimates_of(factors, bases)
    rows = [f.unsqueeze(0) for f in factors]
    whiteners = eigenbasis_whiteners([b.unsqueeze(0) for b in bases], [v.unsqueeze(0) for v in eigenvalues])
    kl_factor_ema_(rows, grad.unsqueeze(0), whiteners, beta, reference.factor_ema_)
    l_inv, r_inv = (_clamped_inverse(b, v) for b, v in zip(bases, eigenvalues))
    # both from the factors before the update (simultaneous)
    expected_left = beta * left + (1 - beta) / n * grad @ r_inv @ grad.T
    expected_right = beta * right + (1 - beta) / m * grad.T @ l_inv @ grad
    torch.testing.assert_close(factors[0], expected_left, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors[1], expected_right, rtol=1e-12, atol=1e-12)


def test_three_axis_update_matches_kronecker_form():
    """F_k <- beta F_k + (1 - beta) d_k / N G_(k) (x)_{j != k} F_j^-1 G_(k)^T; an axis without a factor is I."""
    g = torch.Generator().manual_seed(1)
    shape, beta = (3, 4, 5), 0.8
    grad = torch.randn(*shape, generator=g, dtype=F64)
    factors = [_spd(3, g), None, _spd(5, g)]
    bases = [None if f is None else initial_basis(f) for f in factors]
    eigenvalues = estimates_of(factors, bases)
    before = [None if f is None else f.clone() for f in factors]
    inverses = [torch.eye(4, dtype=F64) if f is None else _clamped_inverse(b, v)
                for f, b, v in zip(factors, bases, eigenvalues)]
    kl_factor_ema_(
        [None if f is None else f.unsqueeze(0) for f in factors], grad.unsqueeze(0),
        eigenbasis_whiteners([None if b is None else b.unsqueeze(0) for b in bases],
                             [None if v is None else v.unsqueeze(0) for v in eigenvalues]),
        beta, reference.factor_ema_,
    )
    numel = math.prod(shape)
    for axis in (0, 2):
        others = _kron([inv for j, inv in enumerate(inverses) if j != axis])
        unfolded = _unfold(grad, axis)
        expected = beta * before[axis] + (1 - beta) * shape[axis] / numel * unfolded @ others @ unfolded.T
        torch.testing.assert_close(factors[axis], expected, rtol=1e-12, atol=1e-12)
    assert factors[1] is None


def test_first_update_is_balanced_and_isotropic():
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(6, 4, generator=g, dtype=F64) * 1e-3
    beta = 0.95
    factors = [torch.full((6, 6), float("nan"), dtype=F64), torch.zeros(4, 4, dtype=F64)]  # overwritten
    initial_kl_factors_([f.unsqueeze(0) for f in factors], grad.unsqueeze(0), beta, reference.factor_ema_)
    ms = grad.square().mean()
    rho = ms.sqrt()  # two factors: rho = ms^(1/2)
    expected = [beta * rho * torch.eye(6, dtype=F64) + (1 - beta) / 4 * grad @ grad.T / rho,
                beta * rho * torch.eye(4, dtype=F64) + (1 - beta) / 6 * grad.T @ grad / rho]
    for factor, want in zip(factors, expected):
        torch.testing.assert_close(factor, want, rtol=1e-12, atol=0)
    # mean eigenvalues multiply to the gradient's mean square: the Kronecker product is at its scale
    means = [torch.trace(f) / f.shape[0] for f in factors]
    torch.testing.assert_close(means[0] * means[1], ms, rtol=1e-12, atol=0)
    # a zero gradient leaves zeros
    zeros = [torch.ones(6, 6, dtype=F64), torch.ones(4, 4, dtype=F64)]
    initial_kl_factors_([f.unsqueeze(0) for f in zeros], torch.zeros(1, 6, 4, dtype=F64), beta, reference.factor_ema_)
    assert all(not f.any() for f in zeros)


def test_zero_eigenvalues_do_not_whiten_and_bad_ones_are_clamped():
    basis = torch.eye(3, dtype=F64).unsqueeze(0)
    ones = eigenbasis_whiteners([basis], [torch.zeros(1, 3, dtype=F64)])[0]
    assert torch.equal(ones, basis)  # no information about an axis: no whitening
    values = torch.tensor([[4.0, float("nan"), -1.0]], dtype=F64)
    scaled = eigenbasis_whiteners([basis], [values])[0]
    floor = 4.0 * EIGENVALUE_FLOOR
    torch.testing.assert_close(scaled.diagonal(dim1=-2, dim2=-1),
                               torch.tensor([[0.5, floor ** -0.5, floor ** -0.5]], dtype=F64))


# ----------------------------------------------------------------- float64 references of the optimizers
def _reference_kl_soap(w, grads, lr, betas, eps, weight_decay, beta_s, frequency):
    """KL-SOAP for one matrix in float64, written from the formulas (SOAP's docstring + eigenbasis.kl)."""
    w = w.clone().to(F64)
    beta1, beta2 = betas
    m_rows, n_cols = w.shape
    grad = grads[0].to(F64)
    rho = grad.square().mean().sqrt()
    left = beta_s * rho * torch.eye(m_rows, dtype=F64) + (1 - beta_s) / n_cols * grad @ grad.T / rho
    right = beta_s * rho * torch.eye(n_cols, dtype=F64) + (1 - beta_s) / m_rows * grad.T @ grad / rho
    factors = [left, right]
    bases = [torch.linalg.eigh(f)[1].flip(1) for f in factors]
    values = [(q * (f @ q)).sum(0) for f, q in zip(factors, bases)]
    exp_avg = torch.zeros_like(w)
    exp_avg_sq = torch.zeros_like(w)
    for step, grad in enumerate(grads[1:], start=1):
        grad = grad.to(F64)
        q_l, q_r = bases
        rotated = q_l.T @ grad @ q_r
        exp_avg = beta1 * exp_avg + (1 - beta1) * rotated
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * rotated.square()
        update = q_l @ (exp_avg / (exp_avg_sq.sqrt() + eps)) @ q_r.T
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        w = (w - step_size * update) * (1 - lr * weight_decay)
        l_inv, r_inv = (_clamped_inverse(q, v) for q, v in zip(bases, values))
        factors = [beta_s * factors[0] + (1 - beta_s) / n_cols * grad @ r_inv @ grad.T,
                   beta_s * factors[1] + (1 - beta_s) / m_rows * grad.T @ l_inv @ grad]
        if step % frequency == 0:
            old = list(bases)
            orders = []
            for axis, (f, q) in enumerate(zip(factors, bases)):
                estimate = (q * (f @ q)).sum(0)
                order = torch.argsort(estimate, descending=True)
                bases[axis] = torch.linalg.qr(f @ q[:, order])[0]
                values[axis] = estimate[order]
                orders.append(order)
            exp_avg = bases[0].T @ (old[0] @ exp_avg @ old[1].T) @ bases[1]
            exp_avg_sq = exp_avg_sq[orders[0]][:, orders[1]]
    return w, factors, values


@pytest.mark.parametrize("foreach", [False, True])
def test_kl_soap_trajectory_matches_float64_reference(foreach):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(6, 4, generator=g) * (1 + 0.3 * t) for t in range(13)]
    w0 = torch.randn(6, 4, generator=g)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    # two same-shaped copies so that the batched path stacks them
    params = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())]
    opt = SOAP(params, precondition_frequency=3, factor_update="kl", foreach=foreach, fused=False, **hyper)
    for grad in grads:
        for p in params:
            p.grad = grad.clone()
        opt.step()
    w, factors, values = _reference_kl_soap(w0, grads, beta_s=0.95, frequency=3, **hyper)
    for p in params:
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=2e-5)
        state = opt.state[p]
        for got, want in zip(state["factors"], factors):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        for got, want in zip(state["eigenvalues"], values):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # the KL update is not the Gram one: the same run with Gram factors ends elsewhere
    gram = [torch.nn.Parameter(w0.clone())]
    other = SOAP(gram, precondition_frequency=3, foreach=foreach, **hyper)
    for grad in grads:
        gram[0].grad = grad.clone()
        other.step()
    assert (gram[0].detach().double() - w).abs().max() > 1e-3


def _reference_kl_shampoo(w, grads, lr, beta1, weight_decay, beta_s, matrix_eps):
    """KL-Shampoo, no grafting, roots every step from step 1, in float64 (Shampoo's docstring + eigenbasis.kl)."""
    w = w.clone().to(F64)
    m_rows, n_cols = w.shape

    def root(f):
        values, vectors = torch.linalg.eigh(f)
        values = values.clamp_min(0) + matrix_eps * values.max()
        return vectors @ torch.diag(values.rsqrt()) @ vectors.T

    exp_avg = torch.zeros_like(w)
    factors = roots = None
    for step, grad in enumerate(grads, start=1):
        grad = grad.to(F64)
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        momentum = exp_avg / (1 - beta1**step)
        if step == 1:
            rho = grad.square().mean().sqrt()
            factors = [beta_s * rho * torch.eye(m_rows, dtype=F64) + (1 - beta_s) / n_cols * grad @ grad.T / rho,
                       beta_s * rho * torch.eye(n_cols, dtype=F64) + (1 - beta_s) / m_rows * grad.T @ grad / rho]
        else:
            l_inv, r_inv = roots[0] @ roots[0], roots[1] @ roots[1]
            factors = [beta_s * factors[0] + (1 - beta_s) / n_cols * grad @ r_inv @ grad.T,
                       beta_s * factors[1] + (1 - beta_s) / m_rows * grad.T @ l_inv @ grad]
        roots = [root(f) for f in factors]
        w = w * (1 - lr * weight_decay) - lr * roots[0] @ momentum @ roots[1]
    return w, factors


def test_kl_shampoo_trajectory_matches_float64_reference():
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(5, 3, generator=g) * 0.01 for _ in range(9)]
    w0 = torch.randn(5, 3, generator=g)
    param = torch.nn.Parameter(w0.clone())
    opt = Shampoo([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, shampoo_beta=0.9, grafting="none",
                  start_preconditioning_step=1, precondition_frequency=1, factor_update="kl")
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    w, factors = _reference_kl_shampoo(w0, grads, lr=1e-2, beta1=0.9, weight_decay=0.01, beta_s=0.9,
                                       matrix_eps=1e-6)
    torch.testing.assert_close(param.detach().double(), w, rtol=0, atol=1e-5)
    for got, want in zip(opt.state[param]["factors"], factors):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_kl_shampoo_whitens_with_the_first_roots_before_preconditioning_starts():
    """Roots are computed at step 1 under KL (so that step 2's update has inverses); the direction still
    waits for start_preconditioning_step (graft only before it)."""
    g = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    opt = Shampoo([param], lr=1e-2, start_preconditioning_step=5, factor_update="kl")
    param.grad = torch.randn(4, 3, generator=g)
    opt.step()
    roots = opt.state[param]["roots"]
    assert not torch.equal(roots[0], torch.eye(4))
    for factor, root in zip(opt.state[param]["factors"], roots):
        inverse = torch.linalg.inv(factor.double())
        damped = torch.linalg.inv(factor.double() + 1e-6 * torch.linalg.eigvalsh(factor.double()).max() * torch.eye(
            factor.shape[0], dtype=F64))
        torch.testing.assert_close((root.double() @ root.double()), damped, rtol=1e-4, atol=0)
        assert (inverse - damped).abs().max() < 1e-3 * inverse.abs().max()


# ----------------------------------------------------------------- paths, resume, checkpoints, errors
SHAPES = [(6, 5), (6, 5), (5, 6), (4, 3, 2), (4, 3, 2), (7,), (12, 3), (3,)]


def _run(options, steps=9, shapes=SHAPES, seed=6):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    opt = SOAP(params, lr=1e-2, factor_update="kl", **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    "options",
    [
        dict(precondition_frequency=2),
        dict(precondition_frequency=3, merge_dims=True, max_precond_dim=6, precondition_1d=True),
        dict(precondition_frequency=1, refresh_tolerance=0.08),
        dict(precondition_frequency=2, one_sided=True),
    ],
)
def test_batched_equals_one_parameter(options):
    batched_params, batched = _run(dict(options, foreach=True, fused=False))
    single_params, single = _run(dict(options, foreach=False))
    for pb, ps in zip(batched_params, single_params):
        torch.testing.assert_close(pb, ps, rtol=0, atol=2e-5)
        sb, ss = batched.state[pb], single.state[ps]
        assert sb.keys() == ss.keys()
        for key in ("factors", "bases", "eigenvalues"):
            for a, b in zip(sb[key], ss[key]):
                assert (a is None) == (b is None), key
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=key)


def test_one_sided_kl_factor_is_the_scaled_gram_ema():
    """A single factor has no other factor to whiten by: F <- beta F + (1 - beta) d / N G G^T (P = 1: rho = ms)."""
    g = torch.Generator().manual_seed(7)
    param = torch.nn.Parameter(torch.randn(3, 8, generator=g))
    opt = SOAP([param], lr=1e-2, one_sided=True, factor_update="kl", foreach=False)
    grads = [torch.randn(3, 8, generator=g) for _ in range(4)]
    expected = None
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        grad = grad.double()
        gram = grad @ grad.T * 3 / 24
        expected = (0.95 * grad.square().mean() * torch.eye(3, dtype=F64) + 0.05 * gram if expected is None
                    else 0.95 * expected + 0.05 * gram)
    torch.testing.assert_close(opt.state[param]["factors"][0].double(), expected, rtol=1e-5, atol=1e-7)
    assert opt.state[param]["factors"][1] is None


def test_resume_is_bitwise():
    params, opt = _run(dict(precondition_frequency=2), steps=5)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    g = torch.Generator().manual_seed(11)
    later = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(5)]
    for grads in later:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    other = SOAP(resumed, lr=1e-2, factor_update="kl", precondition_frequency=2)
    other.load_state_dict(saved)
    for grads in later:
        for p, grad in zip(resumed, grads):
            p.grad = grad.clone()
        other.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key in ("factors", "bases", "eigenvalues"):
            for x, y in zip(opt.state[a][key], other.state[b][key]):
                assert (x is None and y is None) or torch.equal(x, y), key


@pytest.mark.parametrize("foreach", [True, False], ids=["batched", "one-parameter"])
def test_a_refresh_keeps_the_eigenvalues_of_a_non_finite_factor(foreach):
    """A refresh takes its estimates diag(O^T F O) from its power step, in the old bases, re-ordered like the
    new columns; a factor that is not finite keeps its basis and its eigenvalues bit for bit (the refresh
    zeroes such a factor for its products: zeros are no estimates)."""
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(2)]
    opt = SOAP(params, lr=1e-2, factor_update="kl", precondition_frequency=2, foreach=foreach, fused=False)
    for _ in range(2):  # the first step builds the bases, the second is no refresh (step 1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    poisoned = opt.state[params[0]]
    poisoned["factors"][1][2, 1] = float("nan")  # its right factor (a row of the bucket's pool when batched)
    before = [[t.clone() for t in opt.state[p][key]] for p in params for key in ("bases", "eigenvalues")]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (once per process, at the next host read)
        opt.step()  # step 2: a refresh
    old_bases = {0: before[0], 1: before[2]}
    for index, p in enumerate(params):
        state = opt.state[p]
        for axis, (factor, basis) in enumerate(zip(state["factors"], old_bases[index])):
            if index == 0 and axis == 1:
                assert torch.equal(state["eigenvalues"][axis], before[1][axis])
                assert torch.equal(state["bases"][axis], basis)
                continue
            estimate = (basis.double() * (factor.double() @ basis.double())).sum(dim=0)
            torch.testing.assert_close(state["eigenvalues"][axis].double(), estimate.sort(descending=True).values,
                                       rtol=1e-5, atol=1e-6)
            assert not torch.equal(state["bases"][axis], basis)


def test_checkpoint_without_eigenvalues_loads_and_estimates_them():
    """A checkpoint saved before the KL update existed (Gram factors, no eigenvalues) loads into a KL-SOAP;
    the next step estimates diag(Q^T F Q) from the loaded factors and bases."""
    params, opt = _run(dict(precondition_frequency=2), steps=3)
    state_dict = copy.deepcopy(opt.state_dict())
    for entry in state_dict["state"].values():
        entry.pop("eigenvalues")
    for group in state_dict["param_groups"]:
        group.pop("factor_update")
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = SOAP(fresh, lr=1e-2, factor_update="kl", precondition_frequency=2)
    other.load_state_dict(state_dict)
    assert other.param_groups[0]["factor_update"] == "kl"
    first = other.state[fresh[0]]
    expected = estimates_of(first["factors"], first["bases"])
    factors_before = [f.clone() for f in first["factors"]]
    bases = [b.clone() for b in first["bases"]]
    fresh[0].grad = torch.randn(fresh[0].shape)
    other.step()  # step 4: no refresh, so the eigenvalues are the ones estimated at load
    for got, want in zip(first["eigenvalues"], expected):
        assert torch.equal(got, want)
    # and they whitened the step's update: the factors moved by the KL statistic with those estimates
    whiteners = eigenbasis_whiteners([b.unsqueeze(0) for b in bases], [v.unsqueeze(0) for v in expected])
    rows = [f.unsqueeze(0) for f in factors_before]
    kl_factor_ema_(rows, fresh[0].grad.unsqueeze(0), whiteners, 0.95, reference.factor_ema_)
    for got, want in zip(first["factors"], factors_before):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and a Gram optimizer drops them (a later switch back re-estimates instead of using stale values)
    gram = SOAP(fresh, lr=1e-2, precondition_frequency=2)
    gram.load_state_dict(other.state_dict())
    gram.param_groups[0]["factor_update"] = "gram"
    fresh[0].grad = torch.randn(fresh[0].shape)
    gram.step()
    assert "eigenvalues" not in gram.state[fresh[0]]


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_bad_factor_update_is_refused_before_anything_changes(cls):
    param = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="factor_update"):
        cls([param], factor_update="KL")
    opt = cls([param], lr=1e-2)
    with pytest.raises(ValueError, match="factor_update"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "factor_update": None})
    param.grad = torch.randn(4, 3)
    opt.step()
    state_dict = opt.state_dict()
    state_dict["param_groups"][0]["factor_update"] = "fisher"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="factor_update"):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    opt.param_groups[0]["factor_update"] = "kl2"
    weights = param.detach().clone()
    with pytest.raises(ValueError, match="factor_update"):
        opt.step()
    assert torch.equal(param.detach(), weights)


def test_kl_shampoo_refuses_another_exponent():
    with pytest.raises(ValueError, match="exponent_override"):
        Shampoo([torch.nn.Parameter(torch.randn(3, 3))], factor_update="kl", exponent_override=0.25)
    Shampoo([torch.nn.Parameter(torch.randn(3, 3))], factor_update="kl", exponent_override=0.5)


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_state_stays_finite_with_huge_tiny_and_zero_gradients(cls):
    """The whitening can make a small gradient large: the update of a statistic that could overflow is
    dropped (as the Gram path's guard does), and zero or subnormal gradients leave finite state."""
    param = torch.nn.Parameter(torch.randn(6, 4))
    extra = dict(grafting="sgd", start_preconditioning_step=1) if cls is Shampoo else {}
    opt = cls([param], lr=1e-3, factor_update="kl", precondition_frequency=1, **extra)
    for scale in (0.0, 1e-40, 1.0, 1e18, 1e-30, 1.0):
        param.grad = torch.randn(6, 4) * scale
        opt.step()
        for value in opt.state[param].values():
            for t in (value if isinstance(value, list) else [value]):
                if isinstance(t, torch.Tensor):
                    assert torch.isfinite(t).all()
        assert torch.isfinite(param).all()


@pytest.mark.parametrize(
    "cls,options",
    [(SOAP, dict(precondition_frequency=3)),
     (Shampoo, dict(precondition_frequency=3, start_preconditioning_step=2, grafting="none"))],
    ids=["soap", "shampoo"],
)
def test_fused_kernels_equal_pytorch_path(cls, options):
    """The KL statistics go through the fused factor kernel (fed the whitened unfoldings, one factor per call):
    the Triton kernels (interpreted on the CPU) against their PyTorch twins, parameters and every state tensor."""
    assert_fused_equals_pytorch(
        lambda params, fused: cls(params, lr=1e-2, factor_update="kl", fused=fused, **options),
        [(6, 5), (6, 5), (9, 3), (3, 2, 4)],
    )
