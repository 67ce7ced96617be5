"""Faults: failing eigendecompositions and QR, non-finite gradients, extreme gradient scales, long
runs of zero gradients and rank-deficient Kronecker factors, for every optimizer configuration.

What is guaranteed (and asserted here):

* eigh that raises for a float32 factor is retried in float64. If that fails too, or eigh returns NaN
  without raising (seen on the device, without a host read), SOAP's first basis is the identity; a
  failing QR (raising or NaN) keeps the previous basis. Each failure kind warns once per process
  (RuntimeWarning): a raise at once, a device-side fallback at the next step's gradient-norm read.
  Nothing non-finite reaches params or state.
  Shampoo computes every root through the same eigh: its fallback is the identity basis, i.e. the
  diagonal root (diag(F) + matrix_eps * max diag(F))^(-p).
* A NaN/Inf gradient raises FloatingPointError naming the parameter before anything is modified.
* Finite gradients from 1e-20 to 1e10 (float32) leave params and state finite. At 1e20, squares
  overflow float32: the Kronecker factors stay finite (a gradient whose Gram matrices could overflow
  contributes a zero Gram matrix) and second moments (``exp_avg_sq*``) are capped at float32's max
  where a square overflowed (torch.optim.Adam stores +inf there and freezes the coordinate).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from harness import (
    ENTRIES,
    SOAP_ENTRIES,
    entry_params,
    groups_without_params,
    kind,
    loss_at,
    make_model,
    non_finite_state,
    params_of,
    refresh_calls,
    train,
)
from registry import assert_bitwise_equal, iter_state_tensors, optimizer_snapshot, snapshot
import soap_optim
from soap_optim import SOAP, Adam, Shampoo
from soap_optim.eigenbasis import bases as bases_module

_ORIGINAL_EIGH = torch.linalg.eigh
SOAP_PATHS = entry_params([e for e in SOAP_ENTRIES if e.name in ("soap", "soap-default-impl")])
SHAMPOO = next(e for e in ENTRIES if e.name == "shampoo")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which soap_optim warnings were already issued in this process, record new ones."""
    monkeypatch.setattr(bases_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _soap_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "soap_optim" in str(w.message)]


def _all_finite(model, opt):
    assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite parameter"
    assert non_finite_state(opt) == {}, non_finite_state(opt)


def _weights(model):
    return [model[0].weight, model[2].weight, model[4].weight]


class _EighSpy:
    """torch.linalg.eigh that fails (raises or returns NaN) for the given dtypes; records input dtypes."""

    def __init__(self, fail_dtypes, mode="raise"):
        self.fail_dtypes, self.mode, self.calls = set(fail_dtypes), mode, []

    def __call__(self, matrix, *args, **kwargs):
        self.calls.append(matrix.dtype)
        if matrix.dtype in self.fail_dtypes:
            if self.mode == "raise":
                raise torch.linalg.LinAlgError("injected eigh failure")
            values, vectors = _ORIGINAL_EIGH(matrix, *args, **kwargs)
            return values, torch.full_like(vectors, float("nan"))
        return _ORIGINAL_EIGH(matrix, *args, **kwargs)


# ----------------------------------------------------------------------------- eigh / QR failures
@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_soap_float32_eigh_failure_is_retried_in_float64(entry, monkeypatch, fresh_warnings):
    spy = _EighSpy({torch.float32}, "raise")
    monkeypatch.setattr(torch.linalg, "eigh", spy)
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 1)  # the first step builds factors and first bases
    factored = [f for p in model.parameters() for f in opt.state[p]["factors"] if f is not None]
    assert spy.calls == [torch.float32, torch.float64] * len(factored)
    for p in model.parameters():
        state = opt.state[p]
        for factor, basis in zip(state["factors"], state["bases"]):
            if factor is None:
                continue
            jitter = (1e-30 * torch.eye(factor.shape[0])).double()
            expected = _ORIGINAL_EIGH(factor.double() + jitter)[1].float().flip(1)
            assert_bitwise_equal(basis, expected)
    assert _soap_warnings(fresh_warnings) == []  # the retry succeeded: nothing to warn about
    train(model, opt, 1, 12)  # through refreshes at calls 4, 7, 10
    assert len(spy.calls) == 2 * len(factored)  # SOAP calls eigh only for a parameter's first basis
    _all_finite(model, opt)


@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_soap_non_finite_eigenvectors_give_the_identity_reported_at_the_next_step(entry, monkeypatch, fresh_warnings):
    """eigh returning NaN without raising is seen on the device (a retry decided by reading it would cost
    a host sync): that first basis is the identity, the count travels with the next step's gradient-norm
    read, which warns; the first refresh (power iteration + QR from the identity) then finds the basis."""
    spy = _EighSpy({torch.float32}, "nan")
    monkeypatch.setattr(torch.linalg, "eigh", spy)
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 1)
    assert set(spy.calls) == {torch.float32}  # no float64 retry: nothing raised
    for p in model.parameters():
        for basis in opt.state[p]["bases"]:
            if basis is not None:
                assert_bitwise_equal(basis, torch.eye(basis.shape[0]))
    assert _soap_warnings(fresh_warnings) == []  # not read yet
    train(model, opt, 1, 2)
    assert _soap_warnings(fresh_warnings) == ["soap_optim: eigh returned non-finite eigenvectors; using the identity basis"]
    train(model, opt, 2, 4)  # call 4 refreshes
    weight = opt.state[model[0].weight]["bases"][0]
    assert not torch.equal(weight, torch.eye(4))
    assert (weight.T @ weight - torch.eye(4)).abs().max() < 1e-5
    _all_finite(model, opt)


@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_soap_eigh_failing_in_float64_too_gives_identity_and_warns_once(entry, monkeypatch, fresh_warnings):
    monkeypatch.setattr(torch.linalg, "eigh", _EighSpy({torch.float32, torch.float64}))
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 3)
    for p in model.parameters():
        for basis in opt.state[p]["bases"]:
            if basis is not None:
                assert_bitwise_equal(basis, torch.eye(basis.shape[0]))
    messages = _soap_warnings(fresh_warnings)
    assert messages == ["soap_optim: eigh failed even in float64; using the identity basis"], messages
    # the first refresh (call 4, by power iteration + QR, which still works) leaves the identity
    train(model, opt, 3, 4)
    weight = opt.state[model[0].weight]
    assert not torch.equal(weight["bases"][0], torch.eye(4))
    eye = torch.eye(4)
    assert (weight["bases"][0].T @ weight["bases"][0] - eye).abs().max() < 1e-5
    train(model, opt, 4, 12)
    _all_finite(model, opt)
    assert len(_soap_warnings(fresh_warnings)) == 1


class _QRSpy:
    """Makes every QR entry point fail (raise, or return NaN for Q / the Householder reflectors):
    torch.linalg.qr and torch.geqrf (whichever the refresh uses); counts the calls."""

    def __init__(self, monkeypatch, mode):
        self.mode, self.calls = mode, 0
        for namespace, name in ((torch.linalg, "qr"), (torch, "geqrf")):
            monkeypatch.setattr(namespace, name, self._failing(getattr(namespace, name)))

    def _failing(self, original):
        def qr(matrix, *args, **kwargs):
            self.calls += 1
            if self.mode == "raise":
                raise torch.linalg.LinAlgError("injected QR failure")
            first, second = original(matrix, *args, **kwargs)
            return torch.full_like(first, float("nan")), second

        return qr


@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_soap_qr_failure_keeps_previous_basis_and_warns_once(entry, mode, monkeypatch, fresh_warnings):
    """With every QR failing, refreshes keep the bases and leave the moments alone: the run equals,
    bit for bit, one that never refreshes."""
    never = make_model()
    never_opt = entry.make(never.parameters(), precondition_frequency=10**9)
    train(never, never_opt, 0, 12)
    assert _soap_warnings(fresh_warnings) == []

    spy = _QRSpy(monkeypatch, mode)
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 3)
    bases_before = [snapshot(opt.state[p]["bases"]) for p in model.parameters()]
    assert spy.calls == 0
    train(model, opt, 3, 4)  # call 4 refreshes
    assert spy.calls > 0
    for p, before in zip(model.parameters(), bases_before):
        assert_bitwise_equal(opt.state[p]["bases"], before)
    train(model, opt, 4, 12)  # refreshes at calls 7 and 10 fail too
    assert_bitwise_equal(params_of(model), params_of(never))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(never_opt))
    assert _soap_warnings(fresh_warnings) == ["soap_optim: QR refresh failed; keeping the previous basis"]
    _all_finite(model, opt)


@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_soap_everything_failing_is_adam_in_the_identity_basis(entry, monkeypatch, fresh_warnings):
    monkeypatch.setattr(torch.linalg, "eigh", _EighSpy({torch.float32, torch.float64}))
    _QRSpy(monkeypatch, "raise")
    model = make_model()
    opt = entry.make(model.parameters())
    losses = train(model, opt, 0, 30)
    for p in model.parameters():
        for basis in opt.state[p]["bases"]:
            if basis is not None:
                assert_bitwise_equal(basis, torch.eye(basis.shape[0]))
    _all_finite(model, opt)
    assert losses[-1] < 0.8 * losses[0]
    assert sorted(_soap_warnings(fresh_warnings)) == [
        "soap_optim: QR refresh failed; keeping the previous basis",
        "soap_optim: eigh failed even in float64; using the identity basis",
    ]


def _shampoo_run(monkeypatch=None, spy=None, calls=9):
    if spy is not None:
        monkeypatch.setattr(torch.linalg, "eigh", spy)
    model = make_model()
    opt = SHAMPOO.make(model.parameters())
    train(model, opt, 0, calls)
    return model, opt


def test_shampoo_float32_eigh_failure_is_retried_in_float64(monkeypatch, fresh_warnings):
    reference, reference_opt = _shampoo_run()
    spy = _EighSpy({torch.float32}, "raise")
    model, opt = _shampoo_run(monkeypatch, spy)
    roots_computed = len(refresh_calls(SHAMPOO, 9)) * sum(
        f is not None for p in model.parameters() for f in opt.state[p]["factors"]
    )
    assert spy.calls == [torch.float32, torch.float64] * roots_computed
    assert _soap_warnings(fresh_warnings) == []
    for p, q in zip(model.parameters(), reference.parameters()):
        for root, expected in zip(opt.state[p]["roots"], reference_opt.state[q]["roots"]):
            if root is not None:
                assert torch.isfinite(root).all()
                error = (root - expected).norm() / expected.norm()
                assert error < 1e-3, error.item()
    _all_finite(model, opt)


def test_shampoo_eigh_failing_everywhere_gives_the_diagonal_root(monkeypatch, fresh_warnings):
    model, opt = _shampoo_run(monkeypatch, _EighSpy({torch.float32, torch.float64}), calls=11)
    assert 11 in refresh_calls(SHAMPOO, 11)  # the roots were just computed from the current factors
    group = opt.param_groups[0]
    assert group["exponent_override"] is None  # matrices: p = 1/4
    for p in _weights(model):
        for factor, root in zip(opt.state[p]["factors"], opt.state[p]["roots"]):
            values = torch.diagonal(factor).clamp_min(0)
            expected = torch.diag((values + group["matrix_eps"] * values.max()).pow(-0.25))
            torch.testing.assert_close(root, expected, rtol=1e-6, atol=0)
    _all_finite(model, opt)
    assert _soap_warnings(fresh_warnings) == ["soap_optim: eigh failed even in float64; using the identity basis"]


# ----------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("when", ["first-step", "refresh-step"])
@pytest.mark.parametrize("entry", entry_params())
def test_non_finite_gradient_changes_nothing(entry, when):
    """NaN, +Inf and -Inf, one after the other, in one entry of one gradient: each step is refused,
    naming the parameter, with params, state and param groups bitwise unchanged; at the first step or
    at a step that would refresh the bases/roots."""
    refreshes = refresh_calls(entry, 11)
    good_steps = 0 if when == "first-step" else (refreshes[1] - 1 if refreshes else 4)
    model, control = make_model(), make_model()
    opt, control_opt = entry.make(model.parameters()), entry.make(control.parameters())
    train(model, opt, 0, good_steps)
    train(control, control_opt, 0, good_steps)
    params_before, state_before = params_of(model), optimizer_snapshot(opt)
    groups_before = snapshot(groups_without_params(opt))

    for bad in (float("nan"), float("inf"), -float("inf")):
        opt.zero_grad()
        loss_at(model, good_steps).backward()
        model[2].weight.grad[1, 2] = bad  # parameter 2 of group 0, shape (4, 4)
        with pytest.raises(FloatingPointError, match=r"parameter 2 of param group 0 \(shape \(4, 4\)\)"):
            opt.step()
        assert_bitwise_equal(params_of(model), params_before)
        assert_bitwise_equal(optimizer_snapshot(opt), state_before)
        assert_bitwise_equal(snapshot(groups_without_params(opt)), groups_before)
        if good_steps == 0:
            assert len(opt.state) == 0
    # training goes on exactly as if the bad gradients had never been seen
    train(model, opt, good_steps, good_steps + 3)
    train(control, control_opt, good_steps, good_steps + 3)
    assert_bitwise_equal(params_of(model), params_of(control))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control_opt))


# ----------------------------------------------------------------------------- gradient scales
_SECOND_MOMENTS = {"exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "max_exp_avg_sq"}


def _scaled_run(entry, scale, steps=8, seed=0):
    model = make_model()
    opt = entry.make(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()
    return model, opt


@pytest.mark.parametrize("entry", entry_params())
def test_gradient_scales_keep_everything_finite(entry):
    """float32 gradients of scale 1e-20 (squares subnormal), 1e-10, 1 and 1e10, through two refreshes."""
    for scale in (1e-20, 1e-10, 1.0, 1e10):
        model, opt = _scaled_run(entry, scale)
        _all_finite(model, opt)
        if "bases" in opt.state[model[0].weight]:
            for p in model.parameters():
                for q in opt.state[p]["bases"]:
                    if q is not None:
                        assert (q.T @ q - torch.eye(q.shape[0])).abs().max() < 1e-5, scale


def _limit(opt, param):
    """The largest gradient norm ``opt`` steps for ``param`` in float32 state (inf: none)."""
    return opt._max_grad_norm(param.shape, opt.param_groups[0], torch.float32)


@pytest.mark.parametrize("entry", entry_params())
def test_float32_gradients_of_1e20(entry):
    """Squares of 1e20 overflow float32. An optimizer whose second moment squares the gradient refuses
    such a step (FloatingPointError naming it, nothing modified): a capped moment would make m/sqrt(v)
    far from 1 and the step far larger than lr. Adafactor takes it: its update is clipped to RMS <= d,
    and params and every state tensor stay finite, second moments capped at float32's max."""
    model = make_model()
    opt = entry.make(model.parameters())
    if _limit(opt, model[0].weight) < 1e20:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e20
        with pytest.raises(FloatingPointError, match="gradient too large for parameter 0 of param group 0"):
            opt.step()
        assert len(opt.state) == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters()))
        return
    model, opt = _scaled_run(entry, 1e20)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    found = non_finite_state(opt)
    assert not found, found
    capped = [
        t for p in model.parameters() for key in _SECOND_MOMENTS for t in iter_state_tensors(opt.state[p].get(key, []))
        if (t == torch.finfo(t.dtype).max).any()
    ]
    assert capped  # the overflow is real
    lr = entry.hparams["lr"]
    for p, p0 in zip(model.parameters(), make_model().parameters()):  # 8 steps of RMS <= lr * d (d = 1)
        assert (p - p0).square().mean().sqrt() <= 8 * lr * (1 + 1e-6) + 8 * lr * entry.hparams.get("weight_decay", 0)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_refuses_overflowing_steps_and_otherwise_is_torch_optim_adams(decoupled, foreach):
    """At 1e20, (1 - beta2) g g overflows float32: torch.optim.Adam stores +inf there (that coordinate
    never moves again); ours refuses those steps before modifying anything, and every step it takes is
    bit for bit torch's (torch.optim fed the same accepted gradients)."""
    ours_cls, torch_cls = (soap_optim.AdamW, torch.optim.AdamW) if decoupled else (Adam, torch.optim.Adam)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, foreach=foreach)
    runs = []
    for cls in (ours_cls, torch_cls):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (3,)]]
        opt = cls(params, **hp)
        for t in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * (1e20 if t in (2, 3) else 1.0)
            if t in (2, 3):
                if cls is ours_cls:
                    with pytest.raises(FloatingPointError, match="gradient too large"):
                        opt.step()
                continue
            opt.step()
        runs.append((params, opt))
    (ours, ours_opt), (ref, ref_opt) = runs
    for p, q in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_bitwise_equal(ours_opt.state[p][key].float(), ref_opt.state[q][key].float(), key)
        assert_bitwise_equal(p.detach(), q.detach(), "params")


@pytest.mark.parametrize("entry", SOAP_PATHS)
def test_a_refused_step_is_no_step(entry):
    """One gradient scaled by 1e20 among normal ones is refused (FloatingPointError, nothing modified);
    training goes on bit for bit as a run that never saw that step, the bucket's other matrix included."""
    shapes = [(4, 4), (4, 4), (4,)]
    runs = []
    for spike in (True, False):
        params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        opt = entry.make(params)
        gen = torch.Generator().manual_seed(7)
        for step in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 5:
                if spike:
                    params[0].grad.mul_(1e20)
                    before = optimizer_snapshot(opt)
                    with pytest.raises(FloatingPointError, match="gradient too large for parameter 0"):
                        opt.step()
                    assert_bitwise_equal(optimizer_snapshot(opt), before)
                continue
            opt.step()
        runs.append((params, opt))
    (params, opt), (reference, reference_opt) = runs
    _params_and_state_finite(params, opt)
    for i in range(3):
        assert_bitwise_equal(params[i].detach(), reference[i].detach(), f"param {i}")
        assert_bitwise_equal(snapshot(opt.state[params[i]]), snapshot(reference_opt.state[reference[i]]))


def _params_and_state_finite(params, opt):
    assert all(torch.isfinite(p).all() for p in params)
    assert not non_finite_state(opt)


# ----------------------------------------------------------------------------- zero and rank-1 gradients
@pytest.mark.parametrize("entry", entry_params())
def test_many_zero_gradients_then_normal_ones(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    for _ in range(15):  # crosses several refreshes with all-zero factors
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    _all_finite(model, opt)
    if kind(entry) is SOAP:
        for p in model.parameters():
            assert all(not f.any() for f in opt.state[p]["factors"] if f is not None)
    losses = train(model, opt, 0, 30)
    _all_finite(model, opt)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # measured: 0.53-0.72


@pytest.mark.parametrize("entry", entry_params())
def test_rank_one_gradients(entry):
    """g = c_t u v^T with fixed u, v: every factor of the weights is rank-1 (one nonzero eigenvalue), so
    eigh and the QR refresh only ever see rank-deficient matrices."""
    model = make_model()
    opt = entry.make(model.parameters())
    gen = torch.Generator().manual_seed(0)
    directions = {p: [torch.randn(n, generator=gen) for n in p.shape] for p in model.parameters()}
    for _ in range(20):
        for p in model.parameters():
            c = torch.randn((), generator=gen)
            p.grad = c * (torch.outer(*directions[p]) if p.dim() == 2 else directions[p][0])
        opt.step()
    _all_finite(model, opt)
    if kind(entry) in (SOAP, Shampoo):
        kl = entry.hparams.get("factor_update") == "kl"
        checked = 0
        for p in model.parameters():
            for factor, direction in zip(opt.state[p]["factors"], directions[p]):
                if factor is not None and factor.shape[0] > 1:
                    values, vectors = torch.linalg.eigh(factor.double())
                    if kl:  # the isotropic start (eigenbasis.kl) plus statistics along the gradients' one direction
                        assert values[-2] - values[0] < 1e-5 * values[-1]
                        cosine = vectors[:, -1] @ direction.double() / direction.double().norm()
                        assert cosine.abs() > 1 - 1e-5
                    else:
                        assert values[-2].abs() < 1e-6 * values[-1]  # rank-1
                    checked += 1
        assert checked >= 3
    if kind(entry) is SOAP:
        for p in model.parameters():
            for q in opt.state[p]["bases"]:
                if q is not None:
                    assert (q.T @ q - torch.eye(q.shape[0])).abs().max() < 1e-5


def test_overflow_guard_runs_only_for_huge_gradients():
    """The gradient check's norms decide whether the factor updates need the overflow guard: off for
    ordinary gradients (no extra pass over them), on as soon as one gradient's norm reaches ~9e18
    (Shampoo with SGD grafting: it never squares a gradient, so it takes such gradients)."""
    param = nn.Parameter(torch.randn(4, 3))
    opt = soap_optim.Shampoo([param], grafting="sgd")
    param.grad = torch.randn(4, 3)
    opt.step()
    assert opt._gradients_may_overflow is False
    param.grad = torch.full((4, 3), 5e18)  # ||G||_F ~ 1.7e19 > sqrt(float32 max / 4) ~ 9.2e18
    opt.step()
    assert opt._gradients_may_overflow is True
    assert all(torch.isfinite(f).all() for f in opt.state[param]["factors"])
