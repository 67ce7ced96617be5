"""The fused kernels against float64 oracles, compiled on a CUDA GPU.

Not collected by the suite (the name has no ``test_`` prefix): ``test_gpu_kernels.py`` runs this file in a
fresh pytest process, without Triton's interpreter, where a GPU exists (and, with small shapes, under
the interpreter on the CPU elsewhere, to keep the cases themselves honest). Every variant a SOAP or
AdamW step takes is covered: the elementwise ``adam_`` kernel over mixed layouts, the factor EMA with
float32 gradients (SOAP's real input) and with beta = 1 (Shampoo's sums), one-sided and no-basis
rotations, unrotate with ``normalize=False`` (SOAP's default), every rotation precision, and a
GPT-2-sized 50257 x 768 embedding (a 768 x 768 factor from K = 50257).
"""
from __future__ import annotations

import os

import pytest
import torch

import soap_optim.kernels as kernels
from soap_optim.kernels import _triton_common, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
fused = kernels.get_ops(True)


def test_kernels_are_compiled_not_interpreted():
    if ON_GPU:
        assert not _triton_common.INTERPRETED, "a CUDA run must use compiled kernels"
        assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    else:
        assert _triton_common.INTERPRETED


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthonormal(batch, dim, gen):
    return torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64))[0]


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


# Relative size of a product's error against float64, per rotation precision (K <= 1024 terms).
PRODUCT_TOL = {"fp32": 2e-5, "tf32x3": 2e-5, "tf32": 3e-3, "bf16": 2e-2}
SHAPES = [(3, 97, 200), (2, 257, 130)] if ON_GPU else [(2, 17, 9)]


@pytest.mark.parametrize("sides", ["both", "left", "right", "none"])
@pytest.mark.parametrize("precision", reference.PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rotate_adam(shape, precision, sides):
    gen = _gen(1)
    batch, m, n = shape
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    q_left = _orthonormal(batch, m, gen) if sides in ("both", "left") else None
    q_right = _orthonormal(batch, n, gen) if sides in ("both", "right") else None
    exp_avg = torch.randn(shape, generator=gen, dtype=torch.float64)
    exp_avg_sq = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    rotated = g
    if q_right is not None:
        rotated = rotated @ q_right
    if q_left is not None:
        rotated = q_left.mT @ rotated
    expected_m = 0.9 * exp_avg + 0.1 * rotated
    expected_v = 0.95 * exp_avg_sq + 0.05 * rotated**2
    expected_d = expected_m / (expected_v.sqrt() + 1e-8)
    on = lambda t: None if t is None else t.to(DEVICE, torch.float32)  # noqa: E731
    m_, v_ = on(exp_avg), on(exp_avg_sq)
    d = fused.rotate_adam_(on(g), on(q_left), on(q_right), m_, v_, beta1=0.9, beta2=0.95, eps=1e-8,
                           precision=precision)
    tol = PRODUCT_TOL[precision] * 4
    _close(m_, expected_m, tol, tol)
    _close(v_, expected_v, tol, tol)
    _close(d, expected_d, tol, tol)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("precision", reference.PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unrotate_apply(shape, precision, normalize):
    gen = _gen(2)
    batch, m, n = shape
    direction = torch.randn(shape, generator=gen, dtype=torch.float64)
    q_left, q_right = _orthonormal(batch, m, gen), _orthonormal(batch, n, gen)
    params = torch.randn(shape, generator=gen, dtype=torch.float64)
    step = torch.rand(batch, generator=gen, dtype=torch.float64)
    update = q_left @ direction @ q_right.mT
    if normalize:
        update = update / (1e-30 + update.square().mean(dim=(1, 2), keepdim=True).sqrt())
    expected = (params - step.view(-1, 1, 1) * update) * (1 - 0.01)
    p = params.to(DEVICE, torch.float32)
    fused.unrotate_apply_(direction.to(DEVICE, torch.float32), q_left.to(DEVICE, torch.float32),
                          q_right.to(DEVICE, torch.float32), p, step_size=step.to(DEVICE, torch.float32),
                          decay=0.01, normalize=normalize, precision=precision)
    tol = PRODUCT_TOL[precision] * 4
    _close(p, expected, tol, tol)


@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("beta", [0.95, 1.0])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_factor_ema(shape, grad_dtype, beta, sides):
    gen = _gen(3)
    batch, m, n = shape
    g = torch.randn(shape, generator=gen).to(grad_dtype)
    left0 = torch.randn(batch, m, m, generator=gen, dtype=torch.float64)
    right0 = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    g64 = g.double()
    keep, blend = (1.0, 1.0) if beta == 1.0 else (beta, 1 - beta)
    left = left0.to(DEVICE, torch.float32) if sides in ("both", "left") else None
    right = right0.to(DEVICE, torch.float32) if sides in ("both", "right") else None
    fused.factor_ema_(left, right, g.to(DEVICE), beta)
    if left is not None:
        _close(left, keep * left0 + blend * g64 @ g64.mT, 1e-5, 1e-4 * n)
    if right is not None:
        _close(right, keep * right0 + blend * g64.mT @ g64, 1e-5, 1e-4 * m)


def test_embedding_sized_factor_and_rotation():
    """GPT-2's token embedding: 50257 x 768, preconditioned on the 768 side only (the vocabulary axis is
    above max_precond_dim). Its Gram has K = 50257 (routed to cuBLAS on a GPU)."""
    rows, cols = (50257, 768) if ON_GPU else (1031, 24)
    gen = _gen(4)
    g = torch.randn(1, rows, cols, generator=gen) / rows**0.5
    right0 = torch.randn(1, cols, cols, generator=gen, dtype=torch.float64)
    right = right0.to(DEVICE, torch.float32)
    fused.factor_ema_(None, right, g.to(DEVICE), 0.95)
    g64 = g.double()
    _close(right, 0.95 * right0 + 0.05 * g64.mT @ g64, 1e-5, 1e-4)
    q_right = _orthonormal(1, cols, gen)
    m_, v_ = torch.zeros(1, rows, cols, device=DEVICE), torch.zeros(1, rows, cols, device=DEVICE)
    d = fused.rotate_adam_(g.to(DEVICE), None, q_right.to(DEVICE, torch.float32), m_, v_, beta1=0.9, beta2=0.95,
                           eps=1e-8)
    rotated = g64 @ q_right
    _close(m_, 0.1 * rotated, 1e-4, 1e-6)
    _close(v_, 0.05 * rotated**2, 1e-4, 1e-9)
    # the direction from the kernel's own moments (m / sqrt(v) amplifies the products' rounding near 0)
    m64, v64 = m_.double().cpu(), v_.double().cpu()
    _close(d, m64 / (v64.sqrt() + 1e-8), 1e-6, 1e-6)


def test_adam_over_mixed_layouts_and_dtypes():
    gen = _gen(5)
    shapes = [(768,), (64, 3, 7, 7), (300, 200), (5,)]
    params64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    m64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    v64 = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.1 for s in shapes]
    layouts = [lambda t: t, lambda t: t.to(memory_format=torch.channels_last), lambda t: t.T.contiguous().T,
               lambda t: t]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16]
    params = [f(p.to(DEVICE, d)) for f, p, d in zip(layouts, params64, dtypes)]
    grads = [g.to(DEVICE, d) for g, d in zip(grads64, dtypes)]
    ms = [f(m.to(DEVICE, torch.float32)) for f, m in zip(layouts, m64)]
    vs = [f(v.to(DEVICE, torch.float32)) for f, v in zip(layouts, v64)]
    fused.adam_(params, grads, ms, vs, beta1=0.9, beta2=0.99, eps=1e-8, step_size=0.01, denom_scale=1.2,
                decay=0.01, decay_first=True)
    for k, (p, g, m0, v0, m, v) in enumerate(zip(params64, grads64, m64, v64, ms, vs)):
        g = grads[k].double().cpu()
        p0 = p.to(dtypes[k]).double()
        exp_m = 0.9 * m0 + 0.1 * g
        exp_v = 0.99 * v0 + 0.01 * g * g
        expected = p0 * (1 - 0.01) - 0.01 * exp_m / (exp_v.sqrt() * 1.2 + 1e-8)
        _close(m, exp_m, 1e-6, 1e-6)
        _close(v, exp_v, 1e-6, 1e-6)
        tol = 1e-2 if dtypes[k] == torch.bfloat16 else 1e-6
        _close(params[k], expected, tol, tol)


def test_lone_matrix_with_long_products_routed_to_cublas():
    """A lone 64 x 4096 matrix with bases on both sides: 64 programs of 64 x 64 tiles on 132 SMs with a
    4096-long loop, which the shape rule sends to torch.bmm on a GPU (the twin's products on the operands
    rounded for each precision); rotate and unrotate against float64, every precision."""
    assert _triton_common.rotation_prefers_cublas(1, 64, 4096, (4096, 64), "fp32")
    shape = (1, 64, 4096) if ON_GPU else (1, 5, 40)
    gen = _gen(5)
    batch, m, n = shape
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    q_left, q_right = _orthonormal(batch, m, gen), _orthonormal(batch, n, gen)
    rotated = q_left.mT @ g @ q_right
    params = torch.randn(shape, generator=gen, dtype=torch.float64)
    on = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    for precision in reference.PRECISIONS:
        m_, v_ = torch.zeros(shape, device=DEVICE), torch.ones(shape, device=DEVICE)
        d = fused.rotate_adam_(on(g), on(q_left), on(q_right), m_, v_, beta1=0.9, beta2=0.95, eps=1e-8,
                               precision=precision)
        tol = PRODUCT_TOL[precision] * 4
        _close(m_, 0.1 * rotated, tol, tol)
        _close(v_, 0.95 + 0.05 * rotated**2, tol, tol)
        p = on(params)
        fused.unrotate_apply_(d, on(q_left), on(q_right), p, step_size=0.1, decay=0.0, precision=precision)
        expected = params - 0.1 * (q_left @ d.double().cpu() @ q_right.mT)
        _close(p, expected, tol, tol)
