"""SOAP(newton_schulz=True), the SOAP-basis + Newton-Schulz update (soap_optim.newton_schulz).

* :func:`orthogonalize` against its closed form: the quintic acts on each singular value of D / ||D||_F and
  keeps the singular vectors, so for D = U diag(s) V^T the result is U diag(p^5(s / ||s||)) V^T.
* Every step of a float64 run against a recomputation from the state before it, written from the formulas
  (SOAP's rotation and moments, the Nesterov ratio as beta1 m_t + (1 - beta1) G~, the polar step by SVD),
  on both SOAP paths; the state itself is SOAP's, bit for bit (the update is all that changes).
* Only merged matrices with a preconditioned axis take it; the fused kernels (interpreted) equal their twins;
  huge, tiny and zero gradients leave everything finite.

The contract (resume, hooks, bad input, closures, mixed precision) runs through tests/registry.py's
``soap-newton-schulz`` entries; distributed parity through tests/distributed_harness.py's.
"""
from __future__ import annotations

import math

import pytest
import torch

from soap_optim import SOAP
from soap_optim.newton_schulz import COEFFICIENTS, ITERATIONS, orthogonalize

from fused_twins import assert_fused_equals_pytorch

F64 = torch.float64


def _iterated_quintic(s: torch.Tensor) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    for _ in range(ITERATIONS):
        s = a * s + b * s**3 + c * s**5
    return s


def _polar_step(d: torch.Tensor) -> torch.Tensor:
    """The closed form of the Newton-Schulz result for one matrix, through its SVD."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u @ torch.diag(_iterated_quintic(s / s.norm())) @ vh


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_orthogonalize_acts_on_singular_values_only(shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    s = 3.0 * torch.logspace(0, -2, k, dtype=F64)
    d = u @ torch.diag(s) @ v.T
    expected = u @ torch.diag(_iterated_quintic(s / s.norm())) @ v.T
    got = orthogonalize(torch.stack([d, 1e-3 * d, torch.zeros_like(d)]))  # batched; the scale does not matter
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], expected, rtol=0, atol=1e-12)
    assert torch.equal(got[2], torch.zeros_like(d))
    # the singular values land where Muon's coefficients put them, around 1
    assert ((torch.linalg.svdvals(got[0]) > 0.6) & (torch.linalg.svdvals(got[0]) < 1.25)).all()


def _grads(shapes, steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=F64) for s in shapes] for _ in range(steps)]


def _run(shapes, grads, **options):
    """Parameters, and each step's (parameters, state) before and after, for a fixed gradient sequence."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in shapes]
    opt = SOAP(params, fused=False, **options)
    records = []
    for step_grads in grads:
        before = _snapshot(params, opt)
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
        records.append((before, _snapshot(params, opt)))
    return params, opt, records


def _snapshot(params, opt):
    def copy(value):
        if isinstance(value, list):
            return [None if t is None else t.clone() for t in value]
        return value.clone() if isinstance(value, torch.Tensor) else value

    return [(p.detach().clone(), {k: copy(v) for k, v in opt.state[p].items()}) for p in params]


HYPER = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, precondition_frequency=3)


@pytest.mark.parametrize("foreach", [False, True], ids=["one-parameter", "batched"])
def test_every_step_matches_a_float64_recomputation(foreach):
    shapes = [(6, 4), (6, 4), (5,), (3, 7)]  # a bucket of two matrices, a vector (Adam), a lone matrix
    grads = _grads(shapes, 9)
    _, _, records = _run(shapes, grads, newton_schulz=True, foreach=foreach, **HYPER)
    _, _, plain_records = _run(shapes, grads, newton_schulz=False, foreach=foreach, **HYPER)
    beta1, beta2 = HYPER["betas"]
    lr, decay = HYPER["lr"], HYPER["lr"] * HYPER["weight_decay"]
    for t, ((before, after), (_, plain_after)) in enumerate(zip(records, plain_records)):
        for index, ((w, state), (new_w, new_state), (plain_w, plain_state)) in enumerate(zip(before, after, plain_after)):
            # everything but the update is SOAP's: the same state, bit for bit
            assert set(new_state) == set(plain_state)
            for key in new_state:
                values = new_state[key] if isinstance(new_state[key], list) else [new_state[key]]
                others = plain_state[key] if isinstance(plain_state[key], list) else [plain_state[key]]
                for a, b in zip(values, others):
                    assert (a is None and b is None) or torch.equal(a, b), (t, index, key)
            if t == 0:  # the first call builds the preconditioner only
                assert torch.equal(new_w, w)
                continue
            if w.dim() != 2:  # a vector keeps SOAP's Adam update
                assert torch.equal(new_w, plain_w), (t, index)
                continue
            q_left, q_right = state["bases"]
            g = grads[t][index]
            rotated = q_left.T @ g @ q_right
            m = beta1 * state["exp_avg"] + (1 - beta1) * rotated
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * rotated**2
            ratio = (beta1 * m + (1 - beta1) * rotated) / (v.sqrt() + HYPER["eps"])
            update = q_left @ _polar_step(ratio) @ q_right.T
            expected = (1 - decay) * (w - lr * 0.2 * math.sqrt(max(w.shape)) * update)
            torch.testing.assert_close(new_w, expected, rtol=0, atol=1e-11, msg=f"step {t}, parameter {index}")
            assert not torch.allclose(new_w, plain_w)  # and it is not SOAP's update


def test_only_merged_matrices_with_a_preconditioned_axis_take_it():
    """A 3-axis tensor, an axis-less group (max_precond_dim=0) and a 1-D tensor step as SOAP; a matrix whose
    one axis is too long for a factor (one side in the standard basis) is orthogonalized."""
    shapes = [(3, 2, 4), (5,), (4, 40)]
    grads = _grads(shapes, 5)
    options = dict(HYPER, max_precond_dim=16, foreach=True)
    params, _, _ = _run(shapes, grads, newton_schulz=True, **options)
    plain, _, _ = _run(shapes, grads, newton_schulz=False, **options)
    assert torch.equal(params[0], plain[0]) and torch.equal(params[1], plain[1])
    assert not torch.allclose(params[2], plain[2])

    g = torch.Generator().manual_seed(5)
    matrix = torch.nn.Parameter(torch.randn(4, 6, generator=g, dtype=F64))
    twin = torch.nn.Parameter(matrix.detach().clone())
    opt = SOAP([{"params": [matrix], "max_precond_dim": 0}], newton_schulz=True, **HYPER)
    plain_opt = SOAP([{"params": [twin], "max_precond_dim": 0}], **HYPER)
    for _ in range(4):
        matrix.grad = torch.randn(4, 6, generator=g, dtype=F64)
        twin.grad = matrix.grad.clone()
        opt.step()
        plain_opt.step()
    assert torch.equal(matrix, twin)


@pytest.mark.parametrize("chosen", [False, True])
def test_checkpoint_without_the_option_takes_the_optimizers_default(chosen):
    """A param group saved before the option existed takes the loading optimizer's default, as torch.optim
    does: off for SOAP(...), on for SOAP(..., newton_schulz=True)."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([param], lr=1e-2)
    param.grad = torch.randn(4, 3)
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["newton_schulz"]
    other = SOAP([torch.nn.Parameter(param.detach().clone())], lr=1e-2, newton_schulz=chosen)
    other.load_state_dict(saved)
    assert other.param_groups[0]["newton_schulz"] is chosen


@pytest.mark.parametrize("foreach", [False, True], ids=["one-parameter", "batched"])
def test_state_stays_finite_with_huge_tiny_and_zero_gradients(foreach):
    params = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2)]
    opt = SOAP(params, lr=1e-3, newton_schulz=True, precondition_frequency=1, foreach=foreach, fused=False)
    for scale in (0.0, 1e-40, 1.0, 1e18, 1e-30, 1.0, 0.0):
        for p in params:
            p.grad = torch.randn(6, 4) * scale
        opt.step()
        for p in params:
            assert torch.isfinite(p).all()
            for value in opt.state[p].values():
                for t in (value if isinstance(value, list) else [value]):
                    if isinstance(t, torch.Tensor):
                        assert torch.isfinite(t).all()


def test_fused_kernels_equal_pytorch_path():
    """The fused kernels (interpreted on the CPU) feed the orthogonalization their moments and apply its result
    through the unrotate kernel: against the twins, parameters and every state tensor."""
    assert_fused_equals_pytorch(
        lambda params, fused: SOAP(params, lr=1e-2, newton_schulz=True, precondition_frequency=3, fused=fused),
        [(6, 5), (6, 5), (9, 3), (3, 2, 4)],
    )
