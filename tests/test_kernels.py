"""The fused SOAP-step kernels (soap_optim.kernels): each Triton launcher against its pure-PyTorch twin,
and each twin against float64 formulas written out here.

The Triton kernels run on the CPU through Triton's interpreter, which conftest.py switches on for the
whole session on machines without CUDA (the interpreter is chosen per process, when a kernel is
defined; switching it on here would also turn every CUDA test collected after this file into an
interpreted one). On a CUDA machine this file is skipped in the main process and runs in its own,
interpreted, with CUDA hidden (``test_gpu_kernels.py``), next to the compiled CUDA cases. Shapes are
kept small (<= 40, tiles of 16 under the interpreter) because the interpreter is slow. Compiling every
kernel configuration for sm_90 needs no GPU and runs in a subprocess without the interpreter.
"""
import os
import copy
import importlib
import pathlib
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import soap_optim.kernels as kernels  # noqa: E402
from soap_optim.kernels import reference  # noqa: E402

if not importlib.import_module("soap_optim.kernels._triton_common").INTERPRETED:
    pytest.skip("Triton's interpreter is off in this process (a CUDA machine): these tests run interpreted in "
                "their own process, see test_gpu_kernels.py", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
fused = kernels.get_ops(True)
twin = kernels.get_ops(False)

# (B, m, n): one element, primes, square, tall, wide, not multiples of the 16-wide interpreter tiles.
SHAPES = [(1, 1, 1), (3, 7, 13), (1, 17, 17), (3, 33, 5), (1, 5, 33), (3, 13, 7)]
SIDES = ["both", "left", "right", "none"]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel vs twin, per dtype of the stored result. Low-precision results may differ by one unit in the
# last place where the fp32 values (which agree to ~1e-6) straddle a rounding boundary.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
# Moments and direction under precision="bf16": both sides round the same operands to bf16, but the
# intermediate of a two-sided rotation is rounded after an fp32 sum whose order differs.
# tf32 and tf32x3 products of the (identically rounded) operands are exact in fp32: only sums differ.
ROTATION_TOL = {"fp32": TOL[torch.float32], "tf32x3": TOL[torch.float32], "tf32": dict(rtol=1e-4, atol=1e-4),
                "bf16": dict(rtol=1e-2, atol=1e-2)}


def _generator(*key):
    """A generator seeded from the test's parameters (crc32: str hashes change between runs)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _orthonormal(batch, dim, gen, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64))[0].to(dtype)


def _bases(batch, m, n, sides, gen, dtype=torch.float32):
    q_left = _orthonormal(batch, m, gen, dtype) if sides in ("both", "left") else None
    q_right = _orthonormal(batch, n, gen, dtype) if sides in ("both", "right") else None
    return q_left, q_right


def _moments(batch, m, n, gen, dtype=torch.float32):
    # exp_avg_sq bounded away from 0 so the direction m / sqrt(v) is well conditioned.
    exp_avg = torch.randn(batch, m, n, generator=gen, dtype=dtype)
    exp_avg_sq = torch.rand(batch, m, n, generator=gen, dtype=dtype) + 0.5
    return exp_avg, exp_avg_sq


def _assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


# ============================================================================ twins vs float64 formulas
@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twin_factor_ema_matches_float64_formula(beta, dtype):
    gen = _generator("twin-factor", beta)
    g = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    left0 = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    right0 = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    left, right = left0.to(dtype, copy=True), right0.to(dtype, copy=True)
    reference.factor_ema_(left, right, g.to(dtype), beta)
    blend = 1.0 if beta == 1.0 else 1.0 - beta
    keep = 1.0 if beta == 1.0 else beta
    expected_left = keep * left0 + blend * torch.einsum("bik,bjk->bij", g, g)
    expected_right = keep * right0 + blend * torch.einsum("bki,bkj->bij", g, g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left.double(), expected_left, **tol)
    torch.testing.assert_close(right.double(), expected_right, **tol)


@pytest.mark.parametrize("sides", SIDES)
def test_twin_rotate_adam_matches_float64_formula(sides):
    gen = _generator("twin-rotate", sides)
    batch, m, n = 2, 5, 7
    g = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    q_left, q_right = _bases(batch, m, n, sides, gen, torch.float64)
    exp_avg0, exp_avg_sq0 = _moments(batch, m, n, gen, torch.float64)
    beta1, beta2, eps = 0.9, 0.95, 1e-8
    rotated = g
    if q_left is not None:
        rotated = torch.einsum("bki,bkj->bij", q_left, rotated)
    if q_right is not None:
        rotated = torch.einsum("bik,bkj->bij", rotated, q_right)
    expected_m = beta1 * exp_avg0 + (1 - beta1) * rotated
    expected_v = beta2 * exp_avg_sq0 + (1 - beta2) * rotated**2
    expected_d = expected_m / (expected_v.sqrt() + eps)
    for dtype, tol in ((torch.float64, dict(rtol=1e-12, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=1e-5))):
        exp_avg, exp_avg_sq = exp_avg0.to(dtype, copy=True), exp_avg_sq0.to(dtype, copy=True)
        cast = [None if q is None else q.to(dtype) for q in (q_left, q_right)]
        direction = reference.rotate_adam_(
            g.to(dtype), *cast, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps
        )
        assert direction.dtype == dtype
        torch.testing.assert_close(exp_avg.double(), expected_m, **tol)
        torch.testing.assert_close(exp_avg_sq.double(), expected_v, **tol)
        torch.testing.assert_close(direction.double(), expected_d, **tol)


@pytest.mark.parametrize("one_step_size", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("sides", SIDES)
def test_twin_unrotate_apply_matches_float64_formula(sides, normalize, one_step_size):
    gen = _generator("twin-unrotate", sides, normalize)
    batch, m, n = 2, 6, 3
    direction = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    q_left, q_right = _bases(batch, m, n, sides, gen, torch.float64)
    params0 = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    step_size = torch.tensor([0.3, 0.3] if one_step_size else [0.3, 0.05], dtype=torch.float64)
    decay = 0.1
    update = direction
    if q_left is not None:
        update = torch.einsum("bik,bkj->bij", q_left, update)
    if q_right is not None:
        update = torch.einsum("bik,bjk->bij", update, q_right)
    if normalize:  # from U itself, per matrix
        update = update / (1e-30 + update.pow(2).mean(dim=(1, 2), keepdim=True).sqrt())
    expected = (1 - decay) * (params0 - step_size.view(-1, 1, 1) * update)
    for dtype, tol in ((torch.float64, dict(rtol=1e-12, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=1e-5))):
        params = params0.to(dtype, copy=True)
        cast = [None if q is None else q.to(dtype) for q in (q_left, q_right)]
        step = 0.3 if one_step_size else step_size.to(dtype)  # a float: one step size for the bucket
        reference.unrotate_apply_(direction.to(dtype), *cast, params, step_size=step, decay=decay, normalize=normalize)
        torch.testing.assert_close(params.double(), expected, **tol)


def test_twin_normalize_uses_the_norm_of_u_not_of_the_direction():
    """With a non-orthonormal basis ||Q N|| != ||N||: the twin must normalise U itself."""
    direction = torch.ones(1, 2, 2, dtype=torch.float64)
    q_left = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    params = torch.zeros(1, 2, 2, dtype=torch.float64)
    reference.unrotate_apply_(direction, q_left, None, params, step_size=torch.ones(1, dtype=torch.float64),
                              decay=0.0, normalize=True)
    update = torch.tensor([[2.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(params[0], -update / update.pow(2).mean().sqrt())


@pytest.mark.parametrize("decay_first", [False, True])
@pytest.mark.parametrize("step_as_tensor", [False, True])
def test_twin_adam_matches_float64_formula(decay_first, step_as_tensor):
    gen = _generator("twin-adam", decay_first, step_as_tensor)
    shapes = [(4, 3), (7,), ()]
    p0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    m0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    v0 = [torch.rand(s, generator=gen, dtype=torch.float64) for s in shapes]
    beta1, beta2, eps, step, scale, decay = 0.9, 0.99, 1e-8, 0.01, 1.7, 0.2
    params, exp_avg, exp_avg_sq = copy.deepcopy(p0), copy.deepcopy(m0), copy.deepcopy(v0)
    reference.adam_(
        params, g, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
        step_size=torch.tensor(step, dtype=torch.float64) if step_as_tensor else step,
        denom_scale=scale, decay=decay, decay_first=decay_first,
    )
    for i in range(len(shapes)):
        m = beta1 * m0[i] + (1 - beta1) * g[i]
        v = beta2 * v0[i] + (1 - beta2) * g[i] ** 2
        u = m / (v.sqrt() * scale + eps)
        p = p0[i] * (1 - decay) - step * u if decay_first else (1 - decay) * (p0[i] - step * u)
        torch.testing.assert_close(exp_avg[i], m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(exp_avg_sq[i], v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(params[i], p, rtol=1e-12, atol=1e-12)


def _round_to_significant_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 rounding of ``x`` to ``bits`` significant bits, ties to even (torch.round)."""
    mantissa, exponent = torch.frexp(x.double())  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent.double())


def test_round_tf32_rounds_to_nearest_even_at_11_significant_bits():
    ulp = 2.0**-10
    special = torch.tensor([1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp / 2 + 2.0**-20, -(1 + 1.5 * ulp), 0.0, -0.0,
                            float("inf"), -float("inf"), 3.4e38])
    expected = torch.tensor([1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 0.0, -0.0, float("inf"), -float("inf"),
                             _round_to_significant_bits(torch.tensor(3.4e38), 11).item()])
    got = reference.round_tf32(special)
    assert torch.equal(got.view(torch.int32), expected.float().view(torch.int32))
    assert torch.isnan(reference.round_tf32(torch.tensor([float("nan")]))).all()
    x = torch.randn(10000, generator=_generator("tf32-round")) * torch.logspace(-30, 30, 10000)
    assert torch.equal(reference.round_tf32(x).double(), _round_to_significant_bits(x, 11))


def test_twin_precisions_multiply_the_rounded_operands():
    """Each precision against float64 products of its operands: tf32/bf16 multiply operands rounded to 11/8
    significant bits; tf32x3 and fp32 are float32-accurate."""
    gen = _generator("twin-precision")
    g = torch.randn(2, 9, 6, generator=gen)
    q_left, q_right = _bases(2, 9, 6, "both", gen)
    exact = q_left.double().mT @ g.double() @ q_right.double()
    errors = {}
    for precision in reference.PRECISIONS:
        exp_avg, exp_avg_sq = _moments(2, 9, 6, _generator("moments"))
        reference.rotate_adam_(g, q_left, q_right, exp_avg, exp_avg_sq, beta1=0.0, beta2=0.0, eps=0.0,
                               precision=precision)
        errors[precision] = (exp_avg.double() - exact).abs().max().item()
        if precision in ("tf32", "bf16"):
            bits = 11 if precision == "tf32" else 8
            rounded = lambda x: _round_to_significant_bits(x, bits)  # noqa: E731
            intermediate = (rounded(g) @ rounded(q_right)).float()  # the twin's float32 intermediate
            expected = rounded(q_left).mT @ rounded(intermediate)
            torch.testing.assert_close(exp_avg.double(), expected, rtol=0, atol=1e-5)
    assert errors["fp32"] < 2e-6 and errors["tf32x3"] < 2e-6, errors
    assert 1e-4 < errors["tf32"] < 1e-2 and 1e-3 < errors["bf16"] < 5e-2, errors


def test_twins_agree_with_the_optimizers_projection_and_update_order():
    """The twins encode SOAP's step: project, Adam, project_back, p <- (1 - decay)(p - step u)."""
    from soap_optim.eigenbasis import project, project_back

    gen = _generator("twin-soap")
    batch, m, n = 2, 5, 4
    g = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    q_left, q_right = _bases(batch, m, n, "both", gen, torch.float64)
    exp_avg, exp_avg_sq = _moments(batch, m, n, gen, torch.float64)
    params = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    expected_params = params.clone()
    expected_m, expected_v = exp_avg.clone(), exp_avg_sq.clone()
    direction = reference.rotate_adam_(g, q_left, q_right, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.95, eps=1e-8)
    reference.unrotate_apply_(direction, q_left, q_right, params, step_size=torch.full((batch,), 0.1,
                              dtype=torch.float64), decay=0.01)
    for b in range(batch):
        bases = [q_left[b], q_right[b]]
        rotated = project(g[b], bases)
        expected_m[b].mul_(0.9).add_(rotated, alpha=0.1)
        expected_v[b].mul_(0.95).addcmul_(rotated, rotated, value=0.05)
        update = project_back(expected_m[b] / (expected_v[b].sqrt() + 1e-8), bases)
        expected_params[b] = (1 - 0.01) * (expected_params[b] - 0.1 * update)
    torch.testing.assert_close(exp_avg, expected_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params, expected_params, rtol=1e-12, atol=1e-12)


# ============================================================================ kernels vs twins
@pytest.mark.parametrize("beta", [0.95, 1.0])
@pytest.mark.parametrize("grad_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_factor_ema_kernel_matches_twin(shape, grad_dtype, beta):
    gen = _generator("factor", shape, grad_dtype, beta)
    batch, m, n = shape
    g = torch.randn(shape, generator=gen).to(grad_dtype)
    left = torch.randn(batch, m, m, generator=gen)
    right = torch.randn(batch, n, n, generator=gen)  # not symmetric: the mirrored tiles must blend their own values
    expected_left, expected_right = left.clone(), right.clone()
    twin.factor_ema_(expected_left, expected_right, g, beta)
    fused.factor_ema_(left, right, g, beta)
    _assert_close(left, expected_left, TOL[torch.float32])
    _assert_close(right, expected_right, TOL[torch.float32])


@pytest.mark.parametrize("side", ["left", "right"])
def test_factor_ema_kernel_one_sided(side):
    gen = _generator("factor-one-sided", side)
    g = torch.randn(3, 33, 7, generator=gen)
    dim = 33 if side == "left" else 7
    factor = torch.randn(3, dim, dim, generator=gen)
    expected = factor.clone()
    if side == "left":
        twin.factor_ema_(expected, None, g, 0.9)
        fused.factor_ema_(factor, None, g, 0.9)
    else:
        twin.factor_ema_(None, expected, g, 0.9)
        fused.factor_ema_(None, factor, g, 0.9)
    _assert_close(factor, expected, TOL[torch.float32])


def test_factor_ema_upper_triangle_equals_full_square():
    factor_ema = importlib.import_module("soap_optim.kernels.factor_ema")
    gen = _generator("factor-symmetry")
    g = torch.randn(2, 40, 9, generator=gen)
    base = torch.randn(2, 40, 40, generator=gen)
    upper, full = base.clone(), base.clone()
    factor_ema.factor_ema_impl(upper, None, g, 0.8, upper_only=True)
    factor_ema.factor_ema_impl(full, None, g, 0.8, upper_only=False)
    # The two paths sum the same k products in different orders (the mirrored half is computed as
    # (j, i)), so they agree to rounding, not bitwise: each float32 result is within
    # gamma_{k+2} (beta |F| + (1 - beta) |G| |G|^T) of the exact value (Higham, dot products), k = 9.
    k, unit = g.shape[-1], 2.0**-24
    magnitude = 0.8 * base.abs() + 0.2 * (g.abs() @ g.abs().mT)
    bound = 2 * (k + 2) * unit / (1 - (k + 2) * unit) * magnitude
    assert bool(((upper - full).abs() <= bound).all())
    assert not torch.equal(upper, base)  # the update happened


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rotate_adam_kernel_matches_twin(shape, sides):
    _check_rotate(shape, sides, torch.float32, "fp32")


@pytest.mark.parametrize("grad_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("precision", reference.PRECISIONS)
@pytest.mark.parametrize("sides", ["both", "right"])
def test_rotate_adam_kernel_precisions_and_grad_dtypes(sides, precision, grad_dtype):
    _check_rotate((3, 13, 7), sides, grad_dtype, precision)


def _check_rotate(shape, sides, grad_dtype, precision):
    gen = _generator("rotate", shape, sides, grad_dtype, precision)
    batch, m, n = shape
    g = torch.randn(shape, generator=gen).to(grad_dtype)
    q_left, q_right = _bases(batch, m, n, sides, gen)
    exp_avg, exp_avg_sq = _moments(batch, m, n, gen)
    expected_m, expected_v = exp_avg.clone(), exp_avg_sq.clone()
    kwargs = dict(beta1=0.9, beta2=0.95, eps=1e-8, precision=precision)
    expected_d = twin.rotate_adam_(g, q_left, q_right, expected_m, expected_v, **kwargs)
    direction = fused.rotate_adam_(g, q_left, q_right, exp_avg, exp_avg_sq, **kwargs)
    assert direction.dtype == torch.float32 and direction.shape == shape
    tol = ROTATION_TOL[precision]
    _assert_close(exp_avg, expected_m, tol)
    _assert_close(exp_avg_sq, expected_v, tol)
    _assert_close(direction, expected_d, tol)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES)
def test_unrotate_apply_kernel_matches_twin(shape, sides, normalize):
    _check_unrotate(shape, sides, torch.float32, normalize, 0.1, "fp32")


@pytest.mark.parametrize("sides", SIDES)
def test_unrotate_apply_kernel_matches_twin_with_one_step_size(sides):
    _check_unrotate((3, 9, 6), sides, torch.float32, False, 0.1, "fp32", one_step_size=True)


@pytest.mark.parametrize("precision", reference.PRECISIONS)
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_unrotate_apply_kernel_param_dtypes(param_dtype, normalize, decay, precision):
    _check_unrotate((3, 17, 6), "both", param_dtype, normalize, decay, precision)


def _check_unrotate(shape, sides, param_dtype, normalize, decay, precision, one_step_size=False):
    gen = _generator("unrotate", shape, sides, param_dtype, normalize, decay, precision)
    batch, m, n = shape
    direction = torch.randn(shape, generator=gen)
    q_left, q_right = _bases(batch, m, n, sides, gen)
    params = torch.randn(shape, generator=gen).to(param_dtype)
    step_size = 0.37 if one_step_size else torch.rand(batch, generator=gen) + 0.1
    expected = params.clone()
    kwargs = dict(step_size=step_size, decay=decay, normalize=normalize, precision=precision)
    twin.unrotate_apply_(direction, q_left, q_right, expected, **kwargs)
    fused.unrotate_apply_(direction, q_left, q_right, params, **kwargs)
    assert params.dtype == param_dtype
    tol = dict(TOL[param_dtype])
    if precision == "bf16" and param_dtype == torch.float32:
        tol = ROTATION_TOL["bf16"]
    _assert_close(params, expected, tol)


def test_unrotate_apply_kernel_normalizes_by_the_norm_of_u():
    """A non-orthonormal basis: normalising by ||N|| instead of ||U|| would be off by a factor ~2."""
    gen = _generator("unrotate-nonorthonormal")
    direction = torch.randn(2, 9, 5, generator=gen)
    q_left = torch.randn(2, 9, 9, generator=gen) * 2.0
    params = torch.zeros(2, 9, 5)
    step_size = torch.ones(2)
    fused.unrotate_apply_(direction, q_left, None, params, step_size=step_size, decay=0.0, normalize=True)
    update = torch.einsum("bik,bkj->bij", q_left.double(), direction.double())
    expected = -update / update.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(params.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("decay_first", [False, True])
@pytest.mark.parametrize("step_as_tensor", [False, True])
def test_adam_kernel_matches_twin(step_as_tensor, decay_first, decay):
    gen = _generator("adam", step_as_tensor, decay_first, decay)
    # 300 elements span three 128-element interpreter blocks with a ragged last one.
    shapes_and_dtypes = [((5, 7), torch.float32), ((33,), torch.bfloat16), ((300,), torch.float16), ((), torch.float32)]
    params = [torch.randn(s, generator=gen).to(d) for s, d in shapes_and_dtypes]
    grads = [torch.randn(s, generator=gen).to(d) for s, d in shapes_and_dtypes]
    exp_avg = [torch.randn(s, generator=gen) for s, _ in shapes_and_dtypes]
    exp_avg_sq = [torch.rand(s, generator=gen) for s, _ in shapes_and_dtypes]
    expected = copy.deepcopy((params, grads, exp_avg, exp_avg_sq))
    kwargs = dict(beta1=0.9, beta2=0.99, eps=1e-8, denom_scale=1.3, decay=decay, decay_first=decay_first,
                  step_size=torch.tensor(0.02) if step_as_tensor else 0.02)
    twin.adam_(*expected, **kwargs)
    fused.adam_(params, grads, exp_avg, exp_avg_sq, **kwargs)
    for i, (_, dtype) in enumerate(shapes_and_dtypes):
        _assert_close(params[i], expected[0][i], TOL[dtype])
        _assert_close(exp_avg[i], expected[2][i], TOL[torch.float32])
        _assert_close(exp_avg_sq[i], expected[3][i], TOL[torch.float32])


def test_adam_kernel_single_tensor():
    p, g = torch.randn(50), torch.randn(50)
    m, v = torch.zeros(50), torch.zeros(50)
    expected = [t.clone() for t in (p, g, m, v)]
    twin.adam_(*expected, beta1=0.9, beta2=0.99, eps=1e-8, step_size=0.1)
    fused.adam_(p, g, m, v, beta1=0.9, beta2=0.99, eps=1e-8, step_size=0.1)
    _assert_close(p, expected[0], TOL[torch.float32])


def _soap_steps(ops, state, grads, *, precision, normalize):
    """A few SOAP steps on a bucket through one set of ops (bases fixed, as between refreshes)."""
    for t, g in enumerate(grads, start=1):
        direction = ops.rotate_adam_(g, state["q_left"], state["q_right"], state["exp_avg"], state["exp_avg_sq"],
                                     beta1=0.9, beta2=0.95, eps=1e-8, precision=precision)
        step_size = torch.full((g.shape[0],), 0.01 * (1 - 0.95**t) ** 0.5 / (1 - 0.9**t))
        ops.unrotate_apply_(direction, state["q_left"], state["q_right"], state["params"], step_size=step_size,
                            decay=0.001, normalize=normalize, precision=precision)
        ops.factor_ema_(state["left"], state["right"], g, 0.95)


@pytest.mark.parametrize("precision,normalize", [("fp32", False), ("tf32x3", False), ("tf32", True), ("bf16", True)])
def test_fused_steps_match_twin_steps(precision, normalize):
    """Parity over several steps: parameters and every state tensor."""
    gen = _generator("steps", precision)
    batch, m, n = 2, 19, 11
    q_left, q_right = _bases(batch, m, n, "both", gen)
    start = dict(
        q_left=q_left, q_right=q_right, params=torch.randn(batch, m, n, generator=gen).to(torch.bfloat16),
        exp_avg=torch.zeros(batch, m, n), exp_avg_sq=torch.zeros(batch, m, n),
        left=torch.zeros(batch, m, m), right=torch.zeros(batch, n, n),
    )
    grads = [torch.randn(batch, m, n, generator=gen) for _ in range(3)]
    state_fused, state_twin = copy.deepcopy(start), copy.deepcopy(start)
    _soap_steps(fused, state_fused, grads, precision=precision, normalize=normalize)
    _soap_steps(twin, state_twin, grads, precision=precision, normalize=normalize)
    for key in start:
        tol = TOL[torch.bfloat16] if key == "params" else ROTATION_TOL[precision]
        _assert_close(state_fused[key], state_twin[key], tol)


@pytest.mark.parametrize("precision,normalize", [("fp32", False), ("bf16", True)])
def test_buckets_beyond_the_grid_limit_launch_in_slices_with_the_same_bits(precision, normalize, monkeypatch):
    """CUDA's grid caps the batch axis at 65535 matrices: larger buckets launch in slices. With the cap
    lowered to 2, a 5-matrix bucket (3 slices, the last one short) gives one launch's bits in every op."""
    common = importlib.import_module("soap_optim.kernels._triton_common")
    assert common.MAX_GRID_BATCH == 65535
    gen = _generator("slices", precision)
    batch, m, n = 5, 9, 7
    q_left, q_right = _bases(batch, m, n, "both", gen)
    start = dict(
        q_left=q_left, q_right=q_right, params=torch.randn(batch, m, n, generator=gen),
        exp_avg=torch.zeros(batch, m, n), exp_avg_sq=torch.zeros(batch, m, n),
        left=torch.zeros(batch, m, m), right=torch.zeros(batch, n, n),
    )
    grads = [torch.randn(batch, m, n, generator=gen) for _ in range(2)]
    whole, sliced = copy.deepcopy(start), copy.deepcopy(start)
    _soap_steps(fused, whole, grads, precision=precision, normalize=normalize)
    monkeypatch.setattr(common, "MAX_GRID_BATCH", 2)
    assert [(s.start, s.stop) for s in common.batch_slices(batch)] == [(0, 2), (2, 4), (4, 5)]
    _soap_steps(fused, sliced, grads, precision=precision, normalize=normalize)
    for key in start:
        assert torch.equal(sliced[key], whole[key]), key
        assert key.startswith("q_") or not torch.equal(sliced[key], start[key]), key  # every op wrote


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3), m=st.integers(1, 20), n=st.integers(1, 20),
    sides=st.sampled_from(SIDES), param_dtype=st.sampled_from(PARAM_DTYPES), normalize=st.booleans(),
)
def test_fused_step_matches_twin_on_drawn_shapes(batch, m, n, sides, param_dtype, normalize):
    gen = _generator("drawn", batch, m, n, sides)
    g = torch.randn(batch, m, n, generator=gen)
    q_left, q_right = _bases(batch, m, n, sides, gen)
    start = dict(
        q_left=q_left, q_right=q_right, params=torch.randn(batch, m, n, generator=gen).to(param_dtype),
        exp_avg=torch.randn(batch, m, n, generator=gen), exp_avg_sq=torch.rand(batch, m, n, generator=gen) + 0.5,
        left=None if q_left is None else torch.zeros(batch, m, m),
        right=None if q_right is None else torch.zeros(batch, n, n),
    )
    state_fused, state_twin = copy.deepcopy(start), copy.deepcopy(start)
    _soap_steps(fused, state_fused, [g], precision="fp32", normalize=normalize)
    _soap_steps(twin, state_twin, [g], precision="fp32", normalize=normalize)
    for key, value in state_twin.items():
        if value is not None:
            _assert_close(state_fused[key], value, TOL[value.dtype])


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_empty_buckets_match_twin(shape):
    """No element to update: nothing launched, except that an empty Gram still scales F by beta."""
    batch, m, n = shape
    g = torch.randn(shape)
    factors = [torch.ones(batch, m, m), torch.ones(batch, n, n)]
    expected = [f.clone() for f in factors]
    fused.factor_ema_(*factors, g, 0.5)
    twin.factor_ema_(*expected, g, 0.5)
    for actual, wanted in zip(factors, expected):
        torch.testing.assert_close(actual, wanted)
    direction = fused.rotate_adam_(g, None, torch.eye(n).expand(batch, n, n), torch.zeros(shape), torch.zeros(shape),
                                   beta1=0.9, beta2=0.9, eps=1e-8)
    assert direction.shape == shape
    fused.unrotate_apply_(direction, None, None, torch.zeros(shape), step_size=torch.ones(batch), decay=0.0,
                          normalize=True)


# ============================================================================ argument errors
@pytest.mark.parametrize("ops_name", ["fused", "twin"])
def test_bad_arguments_raise_value_error(ops_name):
    ops = fused if ops_name == "fused" else twin
    g = torch.randn(2, 4, 3)
    m, v = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="grad"):
        ops.factor_ema_(None, None, torch.randn(4, 3), 0.9)
    with pytest.raises(ValueError, match="left"):
        ops.factor_ema_(torch.zeros(2, 3, 3), None, g, 0.9)
    with pytest.raises(ValueError, match="beta"):
        ops.factor_ema_(None, torch.zeros(2, 3, 3), g, 1.5)
    with pytest.raises(ValueError, match="q_right"):
        ops.rotate_adam_(g, None, torch.eye(4).expand(2, 4, 4), m, v, beta1=0.9, beta2=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="precision"):
        ops.rotate_adam_(g, None, None, m, v, beta1=0.9, beta2=0.9, eps=1e-8, precision="fp8")
    with pytest.raises(ValueError, match="step_size"):
        ops.unrotate_apply_(m, None, None, g.clone(), step_size=torch.full((3,), 0.1), decay=0.0)
    with pytest.raises(ValueError, match="step_size"):
        ops.unrotate_apply_(m, None, None, g.clone(), step_size="0.1", decay=0.0)
    with pytest.raises(ValueError, match="same length"):
        ops.adam_([g], [g, g], [m], [v], beta1=0.9, beta2=0.9, eps=1e-8, step_size=0.1)


def test_fused_rejects_float64_state():
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    m, v = torch.zeros_like(g), torch.zeros_like(g)
    reference.rotate_adam_(g, None, None, m, v, beta1=0.9, beta2=0.9, eps=1e-8)  # the twin accepts float64
    with pytest.raises(ValueError, match="float32"):
        fused.rotate_adam_(g, None, None, m, v, beta1=0.9, beta2=0.9, eps=1e-8)


def _adam_lists(gen):
    """p, g, m, v lists over the layouts a model has: contiguous, channels_last (same strides on all four),
    a transposed parameter with a contiguous gradient (mixed strides), a bf16 parameter, an empty one."""
    conv = torch.randn(4, 3, 5, 2, generator=gen).to(memory_format=torch.channels_last)
    shapes_and_params = [
        torch.randn(7, generator=gen),
        conv,
        torch.randn(6, 5, generator=gen).T,
        torch.randn(33, generator=gen).to(torch.bfloat16),
        torch.randn(0, 3, generator=gen),
    ]
    params = shapes_and_params
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    grads[1] = grads[1].to(memory_format=torch.channels_last)
    exp_avg = [torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last) if p.dim() == 4
               else torch.randn(p.shape, generator=gen) for p in params]
    exp_avg_sq = [torch.rand_like(m) + 0.1 for m in exp_avg]
    return params, grads, exp_avg, exp_avg_sq


def test_fused_adam_updates_every_layout_in_one_launch_per_dtype_pair(monkeypatch):
    import soap_optim.kernels.adam as adam_module

    gen = _generator("adam-layouts")
    fused_lists = _adam_lists(gen)
    twin_lists = [[t.clone(memory_format=torch.preserve_format) for t in ts] for ts in fused_lists]
    launches = []
    real_launch = adam_module._launch
    monkeypatch.setattr(adam_module, "_launch", lambda quads, *a: (launches.append(len(quads)), real_launch(quads, *a)))
    kwargs = dict(beta1=0.9, beta2=0.99, eps=1e-8, step_size=0.01, denom_scale=1.3, decay=0.01, decay_first=True)
    fused.adam_(*fused_lists, **kwargs)
    twin.adam_(*twin_lists, **kwargs)
    assert sorted(launches) == [1, 3]  # float32 params (3 non-empty tensors) and the bf16 one
    for name, got, expected in zip(("params", "grads", "exp_avg", "exp_avg_sq"), fused_lists, twin_lists):
        for index, (a, b) in enumerate(zip(got, expected)):
            assert a.stride() == b.stride(), (name, index)
            _assert_close(a, b, TOL[a.dtype] if a.dtype in TOL else TOL[torch.float32])


def test_fused_adam_checks_every_tensor_before_the_first_launch():
    """A bad tensor last in the list: ValueError, and no tensor before it was touched (the old launcher
    checked inside its per-tensor loop and had already updated the ones before)."""
    gen = _generator("adam-whole")
    lists = _adam_lists(gen)
    lists[2].append(torch.zeros(3, dtype=torch.float64))  # a float64 moment: the kernel keeps float32
    for t, ts in zip((torch.ones(3), torch.ones(3), None, torch.ones(3)), lists):
        if t is not None:
            ts.append(t)
    before = [[t.clone() for t in ts] for ts in lists]
    with pytest.raises(ValueError, match="float32"):
        fused.adam_(*lists, beta1=0.9, beta2=0.99, eps=1e-8, step_size=0.01)
    for ts, saved in zip(lists, before):
        for t, s in zip(ts, saved):
            assert torch.equal(t, s)


# ============================================================================ subprocesses
def _run_python(body: str, *, interpret: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter, from the repository root, with or without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_import_and_twins_work_without_triton():
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import soap_optim.kernels as kernels
        assert not kernels.triton_available()
        import torch
        ops = kernels.get_ops(False)
        ops.adam_(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3), beta1=0.9, beta2=0.9, eps=1e-8,
                  step_size=0.1)
        try:
            kernels.get_ops(True)
        except RuntimeError as error:
            print("RuntimeError:", error)
        """,
        interpret=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeError:" in result.stdout and "Triton" in result.stdout


def test_fused_on_cpu_without_interpreter_raises_runtime_error():
    result = _run_python(
        """
        import torch
        import soap_optim.kernels as kernels
        try:
            ops = kernels.get_ops(True)  # no CUDA device: refused here
            ops.adam_(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3), beta1=0.9, beta2=0.9,
                      eps=1e-8, step_size=0.1)  # with one: CPU tensors refused here
        except RuntimeError as error:
            print("RuntimeError:", error)
        """,
        interpret=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeError:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_every_kernel_configuration_compiles_for_sm90_without_spills():
    """Every tile the launchers can pick, every constexpr path, compiled for sm_90a by Triton's compiler
    and assembled by its ptxas with -v, whose report of spill bytes must be zero for each (spills never
    show in the PTX). No GPU needed; the interpreter is off in the subprocess."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip(f"Triton's ptxas for sm_90 is not available ({ptxas!r}): spills cannot be counted here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_spills.py"), "--check"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert "configurations compiled for sm_90a" in result.stdout, result.stderr[-4000:]
    assert result.returncode == 0, result.stdout


def test_tall_k_grams_go_to_cublas_by_a_shape_rule():
    """The shape rule sends the embedding's 768 x 768 Gram over K = 50257 to torch.baddbmm (a grid of 78
    programs on 132 SMs), keeps square and small-K Grams on the kernel; the routed path is the twin."""
    from soap_optim.kernels import factor_ema

    assert factor_ema.prefers_cublas(1, 768, 50257)
    assert not factor_ema.prefers_cublas(1, 768, 3072)  # a transformer weight's factor
    assert not factor_ema.prefers_cublas(12, 768, 50257)  # a bucket of 12 fills the GPU: 936 programs
    gen = _generator("tall-k")
    g = torch.randn(1, 40, 400, generator=gen)
    assert factor_ema.prefers_cublas(1, 40, 400)
    left, expected = torch.randn(1, 40, 40, generator=gen), None
    expected = left.clone()
    twin.factor_ema_(expected, None, g, 0.9)
    factor_ema.factor_ema_impl(left, None, g, 0.9, route_to_cublas=True)
    assert torch.equal(left, expected)


def test_small_batch_rotations_go_to_cublas_by_a_shape_rule():
    """A rotation whose grid of 64 x 64 tiles does not fill 132 SMs and whose longest product loops over
    K >= 2048 goes to torch.bmm; buckets that fill the GPU, short loops and rotations without a basis stay
    on the kernels."""
    from soap_optim.kernels._triton_common import rotation_prefers_cublas as routes

    for precision in reference.PRECISIONS:
        assert routes(1, 64, 4096, (4096, 64), precision)  # 64 programs, a 4096-long loop
        assert routes(1, 16, 4096, (4096,), precision)  # a LoRA-shaped factor, right basis only
        assert routes(2, 128, 2048, (2048, 128), precision)  # 2 x 64 = 128 programs
        assert not routes(3, 128, 2048, (2048, 128), precision)  # 192 programs fill the GPU
        assert not routes(12, 64, 4096, (4096, 64), precision)  # a bucket of 12: 768 programs
        assert not routes(1, 768, 768, (768, 768), precision)  # a transformer weight alone: short loops
        assert not routes(1, 8, 24, (24, 8), precision)
        assert not routes(1, 16, 4096, (), precision)  # no basis: no product
        assert not routes(1, 2048, 2048, (2048, 2048), precision)  # 1024 programs


@pytest.mark.parametrize("precision", reference.PRECISIONS)
@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_routed_rotations_are_the_twin_and_match_the_kernels(sides, precision, monkeypatch):
    """With the rule's K threshold lowered so that small buckets route: the routed rotate and unrotate are the
    twin's bits, and differ from the kernels' only as the twin does (the same rounded operands, float32 sums
    in another order: within the kernel-vs-twin tolerance of each precision)."""
    from soap_optim.kernels import _triton_common, rotate_adam, unrotate_apply

    monkeypatch.setattr(_triton_common, "_ROTATION_LONG_K", 1)
    gen = _generator("routed", sides, precision)
    batch, m, n = 2, 19, 11
    assert _triton_common.rotation_prefers_cublas(batch, m, n, (n, m), precision)
    g = torch.randn(batch, m, n, generator=gen)
    q_left, q_right = _bases(batch, m, n, sides, gen)
    moments = _moments(batch, m, n, gen)
    kwargs = dict(beta1=0.9, beta2=0.95, eps=1e-8, precision=precision)
    runs = {}
    for name, call in (
        ("twin", lambda *a: twin.rotate_adam_(*a, **kwargs)),
        ("routed", lambda *a: rotate_adam.rotate_adam_impl(*a, **kwargs, route_to_cublas=True)),
        ("kernel", lambda *a: rotate_adam.rotate_adam_impl(*a, **kwargs, route_to_cublas=False)),
    ):
        exp_avg, exp_avg_sq = moments[0].clone(), moments[1].clone()
        runs[name] = [call(g, q_left, q_right, exp_avg, exp_avg_sq), exp_avg, exp_avg_sq]
    params = torch.randn(batch, m, n, generator=gen)
    for normalize in (False, True):
        step = dict(step_size=torch.full((batch,), 0.01), decay=0.001, normalize=normalize, precision=precision)
        for name, call in (
            ("twin", lambda *a: twin.unrotate_apply_(*a, **step)),
            ("routed", lambda *a: unrotate_apply.unrotate_apply_impl(*a, **step, route_to_cublas=True)),
            ("kernel", lambda *a: unrotate_apply.unrotate_apply_impl(*a, **step, route_to_cublas=False)),
        ):
            updated = params.clone()
            call(runs[name][0], q_left, q_right, updated)
            runs[name].append(updated)
    for routed, expected in zip(runs["routed"], runs["twin"]):
        assert torch.equal(routed, expected)
    for routed, kernel in zip(runs["routed"], runs["kernel"]):
        _assert_close(routed, kernel, ROTATION_TOL[precision])
    assert not torch.equal(runs["routed"][3], params)  # the update happened


_CONFIG_RULES = """
import triton
import soap_optim.kernels._triton_common as common
from soap_optim.kernels import adam, factor_ema, rotate_adam, unrotate_apply
assert not common.INTERPRETED
for kernel in (common._matmul_kernel, rotate_adam._rotate_adam_kernel, unrotate_apply._unrotate_apply_kernel,
               unrotate_apply._apply_normalized_kernel, factor_ema._gram_ema_kernel, adam._adam_kernel):
    assert isinstance(kernel, triton.runtime.jit.JITFunction), f"{kernel} is tuned by timing"
for precision in ("fp32", "tf32x3", "tf32", "bf16"):
    allowed = common.compiled_matmul_configs(precision)
    for batch, m, n in [(1, 1, 1), (1, 768, 768), (4, 768, 3072), (64, 64, 64), (1, 50257, 768)]:
        first = common.matmul_config(batch, m, n, precision)
        assert first is common.matmul_config(batch, m, n, precision) and first in allowed
        print(precision, batch, m, n, first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"], first.num_warps)
print("RULES OK")
"""


def test_tiles_are_chosen_by_shape_rules_not_by_timing():
    """No kernel is autotuned (a timing-based pick can differ between ranks and runs, and the tile sets the
    summation order); the compiled launchers' tile is a function of the shape and precision alone."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _CONFIG_RULES], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "RULES OK" in result.stdout, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line and line[0] in "ftb"]
    tiles = {(r[0], int(r[1]), int(r[2]), int(r[3])): (int(r[4]), int(r[5])) for r in rows}
    assert all(tile == (64, 64) for key, tile in tiles.items() if key[0] == "fp32")  # the spill-free fp32 tile
    assert tiles[("tf32x3", 4, 768, 3072)] == (128, 64) and tiles[("tf32x3", 1, 768, 768)] == (64, 64)


def test_groups_on_several_devices_never_start_the_kernels():
    """The kernels' eligibility is decided for the whole group before anything runs: a group spread over
    two devices is refused by fused=True and takes the twins by default (a launch refused by the second
    device's tensors would otherwise come after the first device's were updated)."""
    from soap_optim import dispatch

    tensors = [torch.zeros(3), torch.zeros(3, device="meta")]
    assert "spans" in dispatch.fused_problem(tensors, torch.float32)
    assert not dispatch.wants_kernels(None, tensors)
