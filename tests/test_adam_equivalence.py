"""SOAP with no preconditioned axis is Adam with the reference's conventions.

Those conventions (first call only builds the preconditioner, eps added to sqrt(v) before bias
correction, decoupled decay applied to the already-updated weights) are written out here
independently, in float64. With them aligned to torch's (no decay, negligible eps, one step
offset) SOAP also matches torch.optim.Adam.
"""
import math

import pytest
import torch

from soap_optim import SOAP


def _grads(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _adam_with_soap_conventions(p0, grads, lr, betas, eps, weight_decay, correct_bias):
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    beta1, beta2 = betas
    for t, g in enumerate(grads[1:], start=1):  # the first gradient only builds the preconditioner
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if correct_bias else lr
        p = p - step_size * m / (v.sqrt() + eps)
        p = p * (1 - lr * weight_decay)
    return p, m, v


# shapes whose every axis is longer than max_precond_dim=4, or 1-D / 0-D without precondition_1d
@pytest.mark.parametrize("shape", [(5, 7), (6, 5, 9), (11,), ()])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_unpreconditioned_soap_is_adam_with_reference_conventions(shape, correct_bias):
    hp = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    grads = _grads(shape, 12, seed=len(shape))
    p0 = torch.randn(shape, dtype=torch.float64)
    param = torch.nn.Parameter(p0.clone())
    opt = SOAP([param], max_precond_dim=4, correct_bias=correct_bias, **hp)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected_p, expected_m, expected_v = _adam_with_soap_conventions(p0, grads, correct_bias=correct_bias, **hp)
    state = opt.state[param]
    assert state["bases"] == [None] * len(state["bases"])
    assert float(state["step"]) == len(grads) - 1
    torch.testing.assert_close(param.detach(), expected_p, rtol=0, atol=1e-14)
    torch.testing.assert_close(state["exp_avg"], expected_m, rtol=0, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"], expected_v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", [(5, 7), (13,)])
def test_aligned_conventions_match_torch_adam(shape):
    grads = _grads(shape, 21, seed=3)
    p0 = torch.randn(shape, dtype=torch.float64)
    ours = torch.nn.Parameter(p0.clone())
    theirs = torch.nn.Parameter(p0.clone())
    soap = SOAP([ours], lr=0.01, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0, max_precond_dim=4)
    adam = torch.optim.Adam([theirs], lr=0.01, betas=(0.9, 0.999), eps=1e-15)
    ours.grad = grads[0].clone()
    soap.step()  # SOAP's first call only builds the preconditioner: torch's step k is SOAP's call k+1
    for g in grads[1:]:
        ours.grad, theirs.grad = g.clone(), g.clone()
        soap.step()
        adam.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(soap.state[ours]["exp_avg"], adam.state[theirs]["exp_avg"], rtol=0, atol=1e-15)
    torch.testing.assert_close(soap.state[ours]["exp_avg_sq"], adam.state[theirs]["exp_avg_sq"], rtol=0, atol=1e-15)


def test_identity_bases_reduce_soap_to_adam():
    """A preconditioned parameter whose bases are the identity (and never refreshed) is Adam."""
    grads = _grads((4, 3), 8, seed=5)
    p0 = torch.randn(4, 3, dtype=torch.float64)
    param = torch.nn.Parameter(p0.clone())
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    opt = SOAP([param], precondition_frequency=1000, **hp)
    param.grad = grads[0]
    opt.step()
    opt.state[param]["bases"] = [torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)]
    for g in grads[1:]:
        param.grad = g.clone()
        opt.step()
    expected_p, expected_m, _ = _adam_with_soap_conventions(p0, grads, correct_bias=True, **hp)
    torch.testing.assert_close(param.detach(), expected_p, rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.state[param]["exp_avg"], expected_m, rtol=0, atol=1e-15)
