"""One-sided and factorized SOAP against an independent float64 re-computation for matrices."""
import math

import pytest
import torch

from soap_optim import SOAP
from soap_optim.eigenbasis import make_plan


def _state_bytes(opt):
    total = 0
    for state in opt.state.values():
        for value in state.values():
            values = value if isinstance(value, list) else [value]
            total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def _matrix_soap_reference(p, grads, *, lr, betas, eps, wd, freq, left, right, factored):
    """Plain float64 SOAP for one matrix; ``left``/``right`` say which sides are rotated.

    Shapes are chosen so that the first factors have at most a 1-D null space: a larger one makes
    the first eigenbasis depend on roundoff (see the golden README on ill-posed cases).
    """
    beta1, beta2 = betas
    m_, n_ = p.shape
    L, R = torch.zeros(m_, m_, dtype=torch.float64), torch.zeros(n_, n_, dtype=torch.float64)
    eye_l, eye_r = torch.eye(m_, dtype=torch.float64), torch.eye(n_, dtype=torch.float64)

    def first_basis(f):
        return torch.linalg.eigh(f + 1e-30 * torch.eye(len(f), dtype=f.dtype))[1].flip(1)

    def refresh(f, q):
        est = torch.diagonal(q.T @ f @ q)
        order = torch.argsort(est, descending=True)
        return torch.linalg.qr(f @ q[:, order])[0], order

    g = grads[0]
    L, R = (1 - beta2) * g @ g.T, (1 - beta2) * g.T @ g
    QL = first_basis(L) if left else eye_l
    QR = first_basis(R) if right else eye_r
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    row, col = torch.zeros(m_, dtype=torch.float64), torch.zeros(n_, dtype=torch.float64)
    for t, g in enumerate(grads[1:], start=1):
        gt = QL.T @ g @ QR
        m = beta1 * m + (1 - beta1) * gt
        if factored:
            row = beta2 * row + (1 - beta2) * (gt**2).mean(1)
            col = beta2 * col + (1 - beta2) * (gt**2).mean(0)
            vhat = torch.outer(row, col) / row.mean()
        else:
            v = beta2 * v + (1 - beta2) * gt**2
            vhat = v
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = (p - step_size * QL @ (m / (vhat.sqrt() + eps)) @ QR.T) * (1 - lr * wd)
        L = beta2 * L + (1 - beta2) * g @ g.T
        R = beta2 * R + (1 - beta2) * g.T @ g
        if t % freq == 0:
            m_full = QL @ m @ QR.T
            if left:
                QL, order = refresh(L, QL)
                v, row = v[order], row[order]
            if right:
                QR, order = refresh(R, QR)
                v, col = v[:, order], col[order]
            m = QL.T @ m_full @ QR
    return p


@pytest.mark.parametrize(
    "one_sided,factorized,shape",
    [(True, False, (5, 9)), (True, False, (9, 5)), (False, True, (6, 5)), (True, True, (4, 7)), (False, False, (6, 5))],
)
def test_lean_variants_match_float64_recomputation(one_sided, factorized, shape):
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(sum(shape))
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(13)]
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(p0.clone())
    opt = SOAP([param], weight_decay=0.05, precondition_frequency=4, one_sided=one_sided, factorized=factorized, **hp)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    left = not one_sided or shape[0] <= shape[1]
    right = not one_sided or shape[1] < shape[0]
    expected = _matrix_soap_reference(
        p0, grads, wd=0.05, freq=4, left=left, right=right, factored=factorized, **hp
    )
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-12)


def test_one_sided_keeps_the_smaller_side_unless_told():
    assert make_plan((8, 3), max_precond_dim=100, merge_dims=False, precondition_1d=False,
                     one_sided=True).preconditioned == (False, True)
    assert make_plan((8, 3), max_precond_dim=100, merge_dims=False, precondition_1d=False,
                     one_sided=True, one_sided_dim=0).preconditioned == (True, False)
    # an axis above max_precond_dim is never chosen
    assert make_plan((3, 8), max_precond_dim=5, merge_dims=False, precondition_1d=False,
                     one_sided=True).preconditioned == (True, False)


def test_lean_variants_save_state_memory():
    sizes = {}
    for name, kw in {"full": {}, "one_sided": dict(one_sided=True), "factorized": dict(factorized=True),
                     "both": dict(one_sided=True, factorized=True)}.items():
        param = torch.nn.Parameter(torch.zeros(64, 32))
        opt = SOAP([param], **kw)
        for _ in range(2):
            param.grad = torch.randn(64, 32)
            opt.step()
        sizes[name] = _state_bytes(opt)
    f32 = 4
    assert sizes["full"] == f32 * (2 * 64 * 32 + 2 * 64 * 64 + 2 * 32 * 32)
    assert sizes["one_sided"] == f32 * (2 * 64 * 32 + 2 * 32 * 32)
    assert sizes["factorized"] == f32 * (64 * 32 + 64 + 32 + 2 * 64 * 64 + 2 * 32 * 32)
    assert sizes["both"] == f32 * (64 * 32 + 64 + 32 + 2 * 32 * 32)
