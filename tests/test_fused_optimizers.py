"""Whole optimizers through the Triton kernels (``fused=True``; on the CPU via Triton's interpreter)
against the PyTorch path, comparing parameters and every state tensor."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused path cannot run")

from soap_optim import SOAP, Adam, AdamW, Shampoo  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_cuda_runs_compiled_kernels():
    """With a GPU, the fused path must run compiled kernels (conftest never switches the interpreter on
    there, and no test module may: the interpreter is chosen per process)."""
    from soap_optim.kernels import _triton_common

    assert _triton_common.INTERPRETED == (DEVICE == "cpu")


def _state_tensors(state):
    for key, value in state.items():
        for index, entry in enumerate(value if isinstance(value, list) else [value]):
            if entry is not None:
                yield f"{key}[{index}]", entry


def _run(cls, shapes, steps, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes] for _ in range(steps)]
    opt = cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return params, opt


def _assert_same(run_a, run_b, tol):
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa.float(), pb.float(), **tol)
        state_a, state_b = dict(_state_tensors(opt_a.state[pa])), dict(_state_tensors(opt_b.state[pb]))
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            # (step: float64 here, exact to 2^53; float32 in torch.optim)
            torch.testing.assert_close(state_a[key], state_b[key].to(state_a[key].dtype), rtol=1e-4, atol=1e-5, msg=key)


# two same-shaped matrices (one bucket), a transposed one, a tall one, a vector, a bucket of 3-D tensors and a
# 4-D one (rotated on their last axis inside the fused ops, on the others by batched products); every
# factor is full rank by the first refresh (a rank-deficient one makes the basis depend on roundoff)
SHAPES = [(6, 5), (6, 5), (5, 6), (9, 3), (7,), (3, 2, 4), (3, 2, 4), (2, 3, 2, 3)]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(normalize_grads=True, weight_decay=0.1, betas=(0.9, 0.99)), dict(max_precond_dim=8)],
    ids=["default", "normalize-decay", "one-sided-by-size"],
)
def test_soap_fused_equals_pytorch_path(options):
    """13 steps at precondition_frequency=5: the first basis plus two refreshes."""
    kw = dict(precondition_frequency=5, **options)
    fused = _run(SOAP, SHAPES, 13, fused=True, **kw)
    pytorch = _run(SOAP, SHAPES, 13, fused=False, **kw)
    _assert_same(fused, pytorch, dict(rtol=1e-5, atol=2e-5))
    assert float(fused[1].state[fused[0][0]]["step"]) == 12


def test_soap_fused_bf16_parameters():
    fused = _run(SOAP, [(6, 5), (6, 5)], 6, dtype=torch.bfloat16, fused=True)
    pytorch = _run(SOAP, [(6, 5), (6, 5)], 6, dtype=torch.bfloat16, fused=False)
    _assert_same(fused, pytorch, dict(rtol=0, atol=2**-6))


@pytest.mark.parametrize("cls,kw", [(AdamW, dict(weight_decay=0.1)), (Adam, dict(weight_decay=0.1, maximize=True))])
def test_adam_fused_equals_torch(cls, kw):
    shapes = [(6, 5), (7,), ()]
    ours = _run(cls, shapes, 8, fused=True, lr=0.01, **kw)
    torch_cls = getattr(torch.optim, cls.__name__)
    theirs = _run(torch_cls, shapes, 8, lr=0.01, foreach=False, **kw)
    _assert_same(ours, theirs, dict(rtol=1e-5, atol=1e-6))


def test_shampoo_fused_factor_update_equals_pytorch_path():
    """Shampoo's Kronecker factors of matrices go through the fused factor kernel; roots every 3 steps."""
    # summed factors (shampoo_beta=1, the default when this tolerance was set)
    kw = dict(precondition_frequency=3, start_preconditioning_step=2, lr=0.01, shampoo_beta=1.0)
    fused = _run(Shampoo, SHAPES, 8, fused=True, **kw)
    pytorch = _run(Shampoo, SHAPES, 8, fused=False, **kw)
    _assert_same(fused, pytorch, dict(rtol=1e-4, atol=1e-5))


def test_fused_true_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], fused=True, amsgrad=True)
