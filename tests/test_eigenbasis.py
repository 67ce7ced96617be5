"""The shared eigenbasis core, unit by unit, against float64 re-computation and closed forms."""
import math
import warnings

import pytest
import torch

from soap_optim.eigenbasis import (
    initial_basis,
    mode_gram,
    permute_axes_,
    project,
    project_back,
    refresh_bases_,
    refreshed_basis,
    update_factors_,
    zero_factors,
)
from soap_optim.eigenbasis import bases as bases_module
from soap_optim.eigenbasis.bases import refreshed_basis_if_any
from soap_optim.eigenbasis.kl import eigenvalue_estimates


def _random_orthonormal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _spd_with_spectrum(eigenvalues, seed):
    q = _random_orthonormal(len(eigenvalues), seed)
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def test_mode_gram_matrix_and_tensor():
    g = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(mode_gram(g, 0), g @ g.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(mode_gram(g, 1), g.T @ g, rtol=0, atol=1e-12)
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(mode_gram(t, 1), torch.einsum("aib,ajb->ij", t, t), rtol=0, atol=1e-12)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(mode_gram(v, 0), torch.outer(v, v), rtol=0, atol=1e-12)


def test_factor_ema_and_accumulation_closed_form():
    g1, g2 = torch.randn(2, 4, 3, dtype=torch.float64)
    factors = zero_factors((4, None), dtype=torch.float64, device="cpu")
    update_factors_(factors, g1, 0.9)
    update_factors_(factors, g2, 0.9)
    expected = 0.9 * 0.1 * g1 @ g1.T + 0.1 * g2 @ g2.T
    torch.testing.assert_close(factors[0], expected, rtol=0, atol=1e-12)
    assert factors[1] is None
    sums = zero_factors((4, 3), dtype=torch.float64, device="cpu")
    update_factors_(sums, g1, 1.0)
    update_factors_(sums, g2, 1.0)
    torch.testing.assert_close(sums[1], g1.T @ g1 + g2.T @ g2, rtol=0, atol=1e-12)


def test_project_matches_explicit_products_and_inverts():
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    bases = [_random_orthonormal(4, 1), None, _random_orthonormal(6, 2)]
    expected = torch.einsum("abc,ai,ck->ibk", x, bases[0], bases[2])
    torch.testing.assert_close(project(x, bases), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(project_back(project(x, bases), bases), x, rtol=0, atol=1e-12)
    m = torch.randn(4, 6, dtype=torch.float64)
    ql, qr = bases[0], bases[2]
    torch.testing.assert_close(project(m, [ql, qr]), ql.T @ m @ qr, rtol=0, atol=1e-12)
    torch.testing.assert_close(project_back(m, [ql, qr]), ql @ m @ qr.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_initial_basis_is_orthonormal_descending_eigenvectors(dtype, tol):
    spectrum = [9.0, 4.0, 2.5, 1.0, 0.25]
    factor, q_true = _spd_with_spectrum(spectrum, 3)
    q = initial_basis(factor.to(dtype)).double()
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), rtol=0, atol=tol)
    torch.testing.assert_close(torch.diagonal(q.T @ factor @ q), torch.tensor(spectrum, dtype=torch.float64),
                               rtol=0, atol=100 * tol)
    torch.testing.assert_close((q_true.T @ q).abs(), torch.eye(5, dtype=torch.float64), rtol=0, atol=1e3 * tol)


def test_initial_basis_of_zero_factor_is_reversed_identity():
    # eigh of the jittered zero factor returns the identity; descending order reverses its columns
    assert torch.equal(initial_basis(torch.zeros(4, 4)), torch.eye(4).flip(1))


def test_refresh_of_converged_basis_is_a_no_op_up_to_signs_and_order():
    spectrum = [0.5, 8.0, 2.0, 1.0]
    factor, q_true = _spd_with_spectrum(spectrum, 4)
    result = refreshed_basis(factor, q_true)  # columns in the wrong (unsorted) order
    assert result is not None
    new_q, order = result
    assert order.tolist() == [1, 2, 3, 0]
    torch.testing.assert_close(new_q.abs(), q_true[:, order].abs(), rtol=0, atol=1e-12)


def test_refresh_converges_to_eigenvectors_by_power_iteration():
    factor, q_true = _spd_with_spectrum([10.0, 3.0, 1.0], 5)
    q = _random_orthonormal(3, 6)
    for _ in range(60):
        q, _ = refreshed_basis(factor, q)
    torch.testing.assert_close((q_true.T @ q).abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_refresh_carries_moments():
    """exp_avg is rotated exactly into the new basis; exp_avg_sq is only permuted."""
    factor_l, _ = _spd_with_spectrum([1.0, 5.0, 3.0], 7)
    factor_r, _ = _spd_with_spectrum([2.0, 1.0, 4.0, 0.5], 8)
    bases = [_random_orthonormal(3, 9), _random_orthonormal(4, 10)]
    old = list(bases)
    exp_avg = torch.randn(3, 4, dtype=torch.float64)
    exp_avg_sq = torch.rand(3, 4, dtype=torch.float64)
    exp_avg_before, exp_avg_sq_before = exp_avg.clone(), exp_avg_sq.clone()
    orders = refresh_bases_([factor_l, factor_r], bases, exp_avg)
    permute_axes_(exp_avg_sq, orders)
    torch.testing.assert_close(project_back(exp_avg, bases), project_back(exp_avg_before, old), rtol=0, atol=1e-12)
    order_l = torch.argsort(torch.diagonal(old[0].T @ factor_l @ old[0]), descending=True)
    order_r = torch.argsort(torch.diagonal(old[1].T @ factor_r @ old[1]), descending=True)
    torch.testing.assert_close(exp_avg_sq, exp_avg_sq_before[order_l][:, order_r], rtol=0, atol=0)
    for q in bases:
        torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=torch.float64), rtol=0, atol=1e-12)


def test_non_finite_factor_never_reaches_eigh_or_qr(monkeypatch):
    """The decision is taken on the device (a zero matrix goes in instead): every input eigh and QR see is
    finite, and the result is the identity (first basis) or the previous basis with the identity order."""
    seen = []

    def spy(original):
        def call(matrix, *args, **kwargs):
            seen.append(bool(torch.isfinite(matrix).all()))
            return original(matrix, *args, **kwargs)

        return call

    monkeypatch.setattr(torch.linalg, "eigh", spy(torch.linalg.eigh))
    monkeypatch.setattr(torch, "geqrf", spy(torch.geqrf))
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    previous = _random_orthonormal(3, 5).float()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert torch.equal(initial_basis(bad), torch.eye(3))
        basis, order = refreshed_basis(bad, previous)
    assert torch.equal(basis, previous) and torch.equal(order, torch.arange(3))
    assert seen and all(seen)


def test_eigh_failure_is_retried_in_float64(monkeypatch):
    real_eigh = torch.linalg.eigh
    seen = []

    def flaky_eigh(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        if matrix.dtype != torch.float64:
            raise torch.linalg.LinAlgError("simulated failure")
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    factor, q_true = _spd_with_spectrum([3.0, 2.0, 1.0], 11)
    q = initial_basis(factor.float())
    assert seen == [torch.float32, torch.float64]
    assert q.dtype == torch.float32
    torch.testing.assert_close((q_true.float().T @ q).abs(), torch.eye(3), rtol=0, atol=1e-5)


def test_eigh_and_qr_failures_keep_previous_basis_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    factor, _ = _spd_with_spectrum([3.0, 2.0, 1.0], 12)
    bases = [_random_orthonormal(3, 13)]
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    monkeypatch.setattr(torch.linalg, "qr", broken)
    monkeypatch.setattr(torch, "geqrf", broken)
    monkeypatch.setattr(bases_module, "_warned", set())
    with pytest.warns(RuntimeWarning, match="eigh failed"):
        assert torch.equal(initial_basis(factor), torch.eye(3, dtype=torch.float64))
    previous = bases[0].clone()
    exp_avg, exp_avg_sq = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    snapshot = (exp_avg.clone(), exp_avg_sq.clone())
    with pytest.warns(RuntimeWarning, match="QR refresh failed"):
        assert refresh_bases_([factor], bases, exp_avg) == [None]
    assert torch.equal(bases[0], previous)
    assert torch.equal(exp_avg, snapshot[0]) and torch.equal(exp_avg_sq, snapshot[1])


def test_refresh_of_a_huge_but_finite_factor_is_kept():
    """The cheap finiteness check reads the factor's sum, which overflows for a finite factor near the
    dtype's limit; the refresh must then still succeed (only a truly non-finite factor is refused)."""
    d = 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))
    eigenvalues = torch.linspace(1.0, 2.0, d) * 1e37  # sum of F's entries: 64 x ~1.5e37, over float32's max
    factor = (q * eigenvalues) @ q.T
    assert torch.isfinite(factor).all() and not torch.isfinite(factor.sum())
    result = refreshed_basis(factor, q)
    assert result is not None
    basis, order = result
    assert torch.isfinite(basis).all()
    torch.testing.assert_close(basis.T @ basis, torch.eye(d), rtol=0, atol=1e-5)
    assert torch.equal(order, torch.arange(d - 1, -1, -1))  # estimates ascend with the column index


@pytest.mark.parametrize("size", [5, 7, 36])
def test_refresh_of_a_stack_equals_each_matrix_refreshed_alone(size):
    """Bitwise: a basis must not depend on which other factors share its stack (owners batch subsets of
    the same-shaped factors; a stack of one is what an owner of one of them runs). Batched LAPACK broke this on AVX-512 CPUs for sizes whose d*d*4 bytes are
    not a multiple of 64; on other CPUs it passed either way."""
    gen = torch.Generator().manual_seed(size)
    grams = torch.randn(3, size, size, generator=gen)
    factors = grams @ grams.mT
    bases = torch.linalg.qr(torch.randn(3, size, size, generator=gen))[0]
    stacked, order = refreshed_basis(factors, bases)
    for i in range(3):
        alone, alone_order = refreshed_basis(factors[i : i + 1].clone(), bases[i : i + 1].clone())
        assert torch.equal(stacked[i], alone[0])
        assert torch.equal(order[i], alone_order[0])


def test_basis_drift_is_the_relative_off_diagonal_mass_of_the_rotated_factor():
    from soap_optim.eigenbasis.bases import basis_drift

    factor, eigenvectors = _spd_with_spectrum([5.0, 2.0, 1.0, 0.5, 0.1], seed=3)
    for angle in (0.0, 0.05, 0.4):
        rotation = torch.eye(5, dtype=torch.float64)
        rotation[0, 0] = rotation[1, 1] = math.cos(angle)
        rotation[0, 1], rotation[1, 0] = -math.sin(angle), math.sin(angle)
        basis = eigenvectors @ rotation
        rotated = basis.T @ factor @ basis
        expected = (rotated - torch.diag(torch.diagonal(rotated))).norm() / rotated.norm()
        factor_basis = factor @ basis
        drift = basis_drift(factor_basis, (basis * factor_basis).sum(dim=-2))
        torch.testing.assert_close(drift, expected, rtol=1e-6, atol=1e-7)
    # in closed form for a 2 x 2 block: off-diagonal entries (l0 - l1) sin cos, on a norm of sqrt(sum l^2)
    assert abs(float(expected) - math.sqrt(2) * 3.0 * math.sin(0.4) * math.cos(0.4) / math.sqrt(30.26)) < 1e-9
    assert float(basis_drift(torch.zeros(4, 4), torch.zeros(4))) == 0.0  # a zero factor needs no refresh


@pytest.mark.parametrize("size", [5, 7, 36])
def test_refresh_with_a_tolerance_keeps_settled_bases_and_stays_independent_of_the_stack(size):
    gen = torch.Generator().manual_seed(size)
    grams = torch.randn(3, size, size, generator=gen)
    factors = grams @ grams.mT
    eigenbases = torch.linalg.eigh(factors.double())[1].flip(-1).float()
    bases = eigenbases.clone()
    bases[1] = torch.linalg.qr(torch.randn(size, size, generator=gen))[0]  # only the middle one has drifted
    result = refreshed_basis_if_any(factors, bases, 0.05)
    new, order, refreshed = result.basis, result.order, result.refreshed
    assert refreshed.tolist() == [False, True, False]
    for i in (0, 2):
        assert torch.equal(new[i], bases[i]) and torch.equal(order[i], torch.arange(size))
    assert torch.equal(new[1], refreshed_basis(factors[1:2].clone(), bases[1:2].clone())[0][0])
    for i in range(3):
        alone = refreshed_basis_if_any(factors[i : i + 1].clone(), bases[i : i + 1].clone(), 0.05)
        assert torch.equal(result.estimates[i], alone.estimates[0])
        if i == 1:
            assert torch.equal(new[i], alone.basis[0]) and torch.equal(order[i], alone.order[0])
        else:  # settled alone: the host knows that nothing changed
            assert alone.basis is None and alone.order is None and alone.refreshed is None
    # the estimates are diag(O^T F O) in the old bases, also where nothing changed
    expected = torch.einsum("bji,bjk,bki->bi", bases.double(), factors.double(), bases.double())
    torch.testing.assert_close(result.estimates.double(), expected, rtol=1e-5, atol=1e-4 * size)


def test_refresh_with_a_tolerance_rotates_the_first_moment_only_where_a_basis_changed():
    gen = torch.Generator().manual_seed(0)
    grams = torch.randn(2, 6, 6, generator=gen)
    factors = [grams @ grams.mT, None]
    settled = torch.linalg.eigh(factors[0].double())[1].flip(-1).float()
    drifted = torch.linalg.qr(torch.randn(6, 6, generator=gen))[0]
    bases = [torch.stack([settled[0], drifted]), None]
    exp_avg = torch.randn(2, 6, 4, generator=gen)
    before = exp_avg.clone()
    orders = refresh_bases_(factors, bases, exp_avg, batch_dims=1, tolerance=0.05)
    assert torch.equal(exp_avg[0], before[0]) and torch.equal(bases[0][0], settled[0])
    # the drifted one: rotated exactly as a refresh without a tolerance rotates it
    alone_bases = [drifted.unsqueeze(0).clone(), None]
    alone = before[1:].clone()
    refresh_bases_([factors[0][1:].clone(), None], alone_bases, alone, batch_dims=1)
    assert torch.equal(exp_avg[1], alone[0]) and torch.equal(bases[0][1], alone_bases[0][0])
    assert torch.equal(orders[0][0], torch.arange(6)) and orders[1] is None


def test_a_non_finite_factor_in_a_stack_keeps_only_its_own_basis_and_moment(monkeypatch):
    """Per matrix, on the device: the bad factor's tensor keeps its basis (identity order) and its first
    moment bit for bit, and NaN eigenvalue estimates (a zeroed factor's zeros are none); the others
    refresh exactly as they would alone."""
    gen = torch.Generator().manual_seed(4)
    grams = torch.randn(3, 5, 5, generator=gen)
    factors = grams @ grams.mT
    factors[1, 2, 3] = float("nan")
    bases = torch.linalg.qr(torch.randn(3, 5, 5, generator=gen))[0]
    exp_avg = torch.randn(3, 5, 4, generator=gen)
    before_bases, before_avg = bases.clone(), exp_avg.clone()
    stack = [bases.clone(), None]
    monkeypatch.setattr(bases_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimates = [None, None]
        orders = refresh_bases_([factors, None], stack, exp_avg, batch_dims=1, estimates=estimates)
    assert torch.equal(stack[0][1], before_bases[1]) and torch.equal(orders[0][1], torch.arange(5))
    assert torch.equal(exp_avg[1], before_avg[1])
    assert torch.isnan(estimates[0][1]).all() and estimates[1] is None
    for i in (0, 2):
        alone_bases, alone_avg = [before_bases[i : i + 1].clone(), None], before_avg[i : i + 1].clone()
        alone_estimates = [None, None]
        alone_orders = refresh_bases_(
            [factors[i : i + 1].clone(), None], alone_bases, alone_avg, batch_dims=1, estimates=alone_estimates
        )
        assert torch.equal(stack[0][i], alone_bases[0][0]) and torch.equal(exp_avg[i], alone_avg[0])
        assert torch.equal(orders[0][i], alone_orders[0][0])
        assert torch.equal(estimates[0][i], alone_estimates[0][0])
        # the bits of KL-SOAP's own product (which the refresh's power step replaced)
        assert torch.equal(estimates[0][i], eigenvalue_estimates(factors[i : i + 1], before_bases[i : i + 1])[0])
    assert all(torch.isfinite(t).all() for t in (stack[0], exp_avg))
    assert any("not finite; keeping the previous basis" in str(w.message) for w in caught)  # read at once outside a step
