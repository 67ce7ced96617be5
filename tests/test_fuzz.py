"""Property-based fuzzing of SOAP over shapes and hyperparameters (hypothesis).

For random shapes (0-d to 4-d, some axes longer than a small max_precond_dim) and random
hyperparameters, a few steps with random finite gradients must keep every invariant of the state:
finite values, the merged layout of the moments, d x d factors/bases exactly where the plan says,
orthonormal bases, non-negative second moments, the step count, and factors equal to the EMA of the
mode-k Gram matrices computed independently here in float64.
"""
from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import SOAP_PATHS, iter_state_tensors
from soap_optim import SOAP
from soap_optim.eigenbasis import make_plan

SIZES = [1, 2, 3, 5, 7, 11, 13]
# A longer run: SOAP_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz.py
MAX_EXAMPLES = int(os.environ.get("SOAP_FUZZ_EXAMPLES", "120"))

shapes = st.lists(st.sampled_from(SIZES), min_size=0, max_size=4).map(tuple)

hyperparameters = st.fixed_dictionaries(
    dict(
        lr=st.sampled_from([1e-4, 3e-3, 0.05, 0.3]),
        betas=st.tuples(st.sampled_from([0.0, 0.5, 0.9, 0.95]), st.sampled_from([0.0, 0.5, 0.95, 0.999])),
        shampoo_beta=st.sampled_from([-1, -0.5, 0.0, 0.5, 0.9, 0.99]),
        eps=st.sampled_from([1e-10, 1e-8, 1e-3]),
        weight_decay=st.sampled_from([0.0, 0.01, 0.5]),
        precondition_frequency=st.integers(1, 4),
        max_precond_dim=st.integers(1, 12),
        merge_dims=st.booleans(),
        precondition_1d=st.booleans(),
        normalize_grads=st.booleans(),
        data_format=st.sampled_from(["channels_first", "channels_last"]),
        correct_bias=st.booleans(),
    )
)


# ----------------------------------------------------------------------------- independent references
def expected_merged_shape(shape, max_dim, merge_dims, data_format="channels_first"):
    """The merge rule of SPEC-soap.md ("Shapes"), written independently of soap_optim.eigenbasis."""
    if not merge_dims or len(shape) == 1 or math.prod(shape) == 0:
        return tuple(shape)
    if data_format == "channels_last" and len(shape) == 4:
        shape = (shape[0], shape[3], shape[1], shape[2])
    out, run = [], 1
    for size in shape:
        if run * size > max_dim:
            if run > 1:
                out.append(run)
                run = size
            else:
                out.append(size)
        else:
            run *= size
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


def expected_factor_dims(shape, merged, max_dim, precondition_1d):
    if len(shape) == 1:
        return (shape[0] if precondition_1d and shape[0] <= max_dim else None,)
    return tuple(d if d <= max_dim else None for d in merged)


def to_merged(grad, merged, hp):
    g = grad.double()
    if hp["merge_dims"] and hp["data_format"] == "channels_last" and g.dim() == 4:
        g = g.permute(0, 3, 1, 2)
    return g.reshape(merged)


def mode_gram(x, axis):
    others = [a for a in range(x.dim()) if a != axis]
    return torch.tensordot(x, x, dims=(others, others))


def test_merge_rule_examples_from_spec():
    # the examples given in SPEC-soap.md, checked against both this file's rule and the library
    examples = {
        (2, 3, 4, 5): (6, 4, 5), (6, 5, 3, 3): (6, 5, 9), (3, 3, 3, 3): (9, 9), (2, 5, 3, 3): (10, 9),
        (16, 12): (16, 12), (2, 20, 3): (2, 20, 3), (20, 1, 1): (20,), (1, 20): (20,), (): (1,),
    }
    for shape, merged in examples.items():
        assert expected_merged_shape(shape, 10, True) == merged, shape
        plan = make_plan(shape, max_precond_dim=10, merge_dims=True, precondition_1d=False)
        assert plan.merged_shape == merged, shape


# ----------------------------------------------------------------------------- the fuzz test
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    param_shapes=st.lists(shapes, min_size=1, max_size=3),
    repeat_first=st.booleans(),
    path=st.sampled_from(sorted(SOAP_PATHS)),
    hp=hyperparameters,
    steps=st.integers(6, 10),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]),
    grad_scale=st.sampled_from([1e-4, 1.0, 1e4]),
    zero_grad_step=st.one_of(st.none(), st.integers(0, 9)),
    seed=st.integers(0, 2**31 - 1),
)
def test_soap_invariants(param_shapes, repeat_first, path, hp, steps, dtype, grad_scale, zero_grad_step, seed):
    if repeat_first:
        # same-shaped parameters share a bucket on the batched path
        param_shapes = param_shapes + [param_shapes[0]]
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in param_shapes]
    initial = [p.detach().clone() for p in params]
    opt = SOAP(params, **hp, **SOAP_PATHS[path])
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shampoo_beta = hp["shampoo_beta"] if hp["shampoo_beta"] >= 0 else hp["betas"][1]
    max_dim = hp["max_precond_dim"]

    reference_factors = [None] * len(params)
    for t in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=gen) * grad_scale
            if t == zero_grad_step:
                g = torch.zeros_like(g)
            grads.append(g.to(dtype))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if t == 0:
            for p, p0 in zip(params, initial):
                assert torch.equal(p.detach(), p0), "the first step must not update the parameter"
        # independent float64 EMA of the mode-k Gram matrices of the merged gradient
        for i, (p, g) in enumerate(zip(params, grads)):
            merged = expected_merged_shape(tuple(p.shape), max_dim, hp["merge_dims"], hp["data_format"])
            gm = to_merged(g.to(state_dtype), merged, hp)
            grams = [mode_gram(gm, k) for k in range(gm.dim())]
            if reference_factors[i] is None:
                reference_factors[i] = [(1 - shampoo_beta) * c for c in grams]
            else:
                reference_factors[i] = [
                    shampoo_beta * f + (1 - shampoo_beta) * c for f, c in zip(reference_factors[i], grams)
                ]

    for i, p in enumerate(params):
        assert p.dtype == dtype
        assert torch.isfinite(p).all(), f"non-finite parameter of shape {tuple(p.shape)}"
        state = opt.state[p]
        for tensor in iter_state_tensors(state):
            assert torch.isfinite(tensor).all()

        shape = tuple(p.shape)
        plan = make_plan(
            shape,
            max_precond_dim=max_dim,
            merge_dims=hp["merge_dims"],
            precondition_1d=hp["precondition_1d"],
            data_format=hp["data_format"],
        )
        merged = expected_merged_shape(shape, max_dim, hp["merge_dims"], hp["data_format"])
        assert plan.merged_shape == merged
        assert math.prod(plan.merged_shape) == p.numel()
        factor_dims = expected_factor_dims(shape, merged, max_dim, hp["precondition_1d"])
        assert plan.factor_dims == factor_dims

        assert state["step"].item() == steps - 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(state[key].shape) == plan.merged_shape, key
            assert state[key].dtype == state_dtype, key
        assert (state["exp_avg_sq"] >= 0).all()

        factors, bases = state["factors"], state["bases"]
        assert len(factors) == len(bases) == len(plan.merged_shape)
        for axis, d in enumerate(factor_dims):
            factor, basis = factors[axis], bases[axis]
            if d is None:
                assert factor is None and basis is None, (shape, axis)
                continue
            assert tuple(factor.shape) == (d, d) and tuple(basis.shape) == (d, d), (shape, axis)
            assert factor.dtype == basis.dtype == state_dtype
            eye = torch.eye(d, dtype=torch.float64)
            q = basis.double()
            assert (q.T @ q - eye).abs().max().item() < 1e-4, (shape, axis)
            expected = reference_factors[i][axis]
            scale = expected.abs().max().item() + 1e-30
            err = (factor.double() - expected).abs().max().item()
            assert err <= 1e-5 * scale + 1e-30, (shape, axis, err, scale)
