"""Long runs on an ill-conditioned problem: least squares for a 32 x 16 weight whose Hessian (the
feature covariance) has condition number 1e4, with SOAP's default hyperparameters.

loss(W) = 0.5 mean((X W^T - Y)^2), Y = X W*^T, X = U diag(s) V^T sqrt(n), s log-spaced from 1 to 1e-2.

The short run (default suite) checks the convergence rate after 300 steps, the slow one (5000
steps) that a long run stays finite and converges to float32 accuracy. Measured (both SOAP paths):
300 steps, |W* entries| ~ 0.1: relative weight error 1.0e-2 (AdamW with the same lr/betas: 0.25),
loss 1.5e-4 of the initial one; 5000 steps, |W* entries| ~ 1: weight error 4e-5, loss 3e-9 of the initial.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import non_finite_state
from soap_optim import SOAP, AdamW

PATHS = [pytest.param({}, id="default-impl"), pytest.param({"foreach": False}, id="single")]


def ill_conditioned_problem(scale: float, seed: int = 0, n: int = 256, condition: float = 1e4):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, 16, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    singular = torch.logspace(0, -0.5 * math.log10(condition), 16, dtype=torch.float64)
    x = (u * singular) @ v.T * math.sqrt(n)
    w_star = scale * torch.randn(32, 16, generator=gen, dtype=torch.float64)
    return x.float(), (x @ w_star.T).float(), w_star.float()


def run(make_opt, scale, steps, check_every=None):
    x, y, w_star = ill_conditioned_problem(scale)
    w = torch.nn.Parameter(torch.zeros(32, 16))
    opt = make_opt([w])
    first = None
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = 0.5 * ((x @ w.T - y) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if check_every and step % check_every == 0:
            assert torch.isfinite(w).all() and non_finite_state(opt) == {}, step
    with torch.no_grad():
        final = (0.5 * ((x @ w.T - y) ** 2).mean()).item()
    error = ((w - w_star).norm() / w_star.norm()).item()
    return w, opt, final / first, error


def test_problem_is_as_ill_conditioned_as_stated():
    x, _, _ = ill_conditioned_problem(1.0)
    eigenvalues = torch.linalg.eigvalsh((x.T @ x).double() / x.shape[0])
    assert 0.95e4 < (eigenvalues[-1] / eigenvalues[0]).item() < 1.05e4


@pytest.mark.parametrize("path", PATHS)
def test_short_run_converges(path):
    w, opt, relative_loss, error = run(lambda p: SOAP(p, **path), scale=0.1, steps=300)
    assert error < 3e-2, error  # measured 1.0e-2
    assert relative_loss < 1e-3, relative_loss  # measured 1.5e-4
    assert non_finite_state(opt) == {}
    # the same budget is not enough without the preconditioner
    _, _, _, adam_error = run(lambda p: AdamW(p, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01), scale=0.1, steps=300)
    assert adam_error > 0.1, adam_error  # measured 0.25


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_5000_steps_stay_finite_and_converge(path):
    w, opt, relative_loss, error = run(lambda p: SOAP(p, **path), scale=1.0, steps=5000, check_every=250)
    assert error < 1e-3, error  # measured 4e-5
    assert relative_loss < 1e-6, relative_loss  # measured 3e-9
    state = opt.state[w]
    assert state["step"].item() == 4999
    for q in state["bases"]:
        assert (q.T @ q - torch.eye(q.shape[0])).abs().max() < 1e-5
