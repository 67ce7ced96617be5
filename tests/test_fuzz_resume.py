"""Property-based fuzzing of checkpoint/resume for the whole family (hypothesis).

Random optimizer (SOAP on each code path, Adam, AdamW, Shampoo, Adafactor), two param groups with
independently drawn hyperparameters, random shapes (0-d to 3-d, repeated shapes so that SOAP's
batched path forms buckets), float32/float64/bf16 parameters, gradients that are sometimes None, and
random save/load points (0 to 2 checkpoints, each through torch.save/torch.load into a fresh
optimizer over fresh parameters). Invariants after every step of both runs:

* finite in, finite out: finite gradients give finite parameters and finite state;
* state is consistent: exactly the parameters that ever had a gradient have state, whose shapes are
  those ``load_state_dict`` expects and whose floating tensors have the state dtype;
* the run with checkpoints equals the uninterrupted run bit for bit (params and every state tensor).

Budget: ``SOAP_FUZZ_RESUME_EXAMPLES`` examples (default 100, 2-5 s here; 1500 took 100 s);
``SOAP_FUZZ_RESUME_EXAMPLES=2000 python -m pytest tests/test_fuzz_resume.py`` for a long run.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness import through_bytes
from registry import assert_bitwise_equal, iter_state_tensors, optimizer_snapshot
from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo
from soap_optim.optimizer import _shape_mismatch, state_dtype

MAX_EXAMPLES = int(os.environ.get("SOAP_FUZZ_RESUME_EXAMPLES", "100"))

_lr = st.sampled_from([1e-3, 1e-2, 0.1])
_betas = st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.5, 0.95, 0.999]))
_decay = st.sampled_from([0.0, 0.01, 0.3])

FAMILIES = {
    "soap-single": (SOAP, dict(foreach=False)),
    "soap-batched": (SOAP, dict(foreach=True, fused=False)),
    "soap-default": (SOAP, dict()),
    "adam": (Adam, dict()),
    "adamw": (AdamW, dict()),
    "shampoo": (Shampoo, dict()),
    "adafactor": (Adafactor, dict()),
}

GROUP_HYPERPARAMETERS = {
    SOAP: st.fixed_dictionaries(dict(
        lr=_lr, betas=_betas, weight_decay=_decay,
        shampoo_beta=st.sampled_from([-1, 0.0, 0.5, 0.9]),
        eps=st.sampled_from([1e-8, 1e-3]),
        precondition_frequency=st.integers(1, 4),
        max_precond_dim=st.sampled_from([2, 3, 4, 100]),
        merge_dims=st.booleans(),
        precondition_1d=st.booleans(),
        normalize_grads=st.booleans(),
        correct_bias=st.booleans(),
        one_sided=st.booleans(),
        factorized=st.booleans(),
    )),
    Adam: st.fixed_dictionaries(dict(
        lr=_lr, betas=_betas, weight_decay=_decay, eps=st.sampled_from([1e-8, 1e-3]), amsgrad=st.booleans(),
        foreach=st.sampled_from([None, False]),
    )),
    Shampoo: st.fixed_dictionaries(dict(
        lr=_lr, betas=_betas, weight_decay=_decay,
        shampoo_beta=st.sampled_from([0.5, 0.9, 1.0]),
        matrix_eps=st.sampled_from([1e-6, 1e-3]),
        precondition_frequency=st.integers(1, 3),
        start_preconditioning_step=st.integers(1, 4),
        exponent_override=st.sampled_from([None, 0.25, 0.5]),
        grafting=st.sampled_from(["adam", "rmsprop", "sgd", "none"]),
        max_precond_dim=st.sampled_from([2, 4, 100]),
        merge_dims=st.booleans(),
        precondition_1d=st.booleans(),
    )),
    Adafactor: st.fixed_dictionaries(dict(
        lr=_lr, weight_decay=_decay,
        beta1=st.sampled_from([None, 0.9]),
        beta2_decay=st.sampled_from([-0.8, -0.5]),
        eps=st.sampled_from([1e-30, 1e-3]),
        d=st.sampled_from([1.0, 0.5]),
    )),
}
GROUP_HYPERPARAMETERS[AdamW] = GROUP_HYPERPARAMETERS[Adam]

shapes = st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=3).map(tuple)
group_shapes = st.lists(shapes, min_size=1, max_size=3).map(lambda s: s + [s[0]])  # a repeated shape


@st.composite
def scenarios(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    cls, path = FAMILIES[family]
    groups = [draw(GROUP_HYPERPARAMETERS[cls]) for _ in range(2)]
    layout = [draw(group_shapes) for _ in range(2)]
    steps = draw(st.integers(2, 9))
    saves = sorted(set(draw(st.lists(st.integers(1, steps - 1), max_size=2))))
    n_params = sum(len(g) for g in layout)
    # per step and parameter: None (no gradient) about one time in five
    present = draw(st.lists(st.lists(st.integers(0, 4), min_size=n_params, max_size=n_params),
                            min_size=steps, max_size=steps))
    return dict(
        family=family, cls=cls, path=path, groups=groups, layout=layout, steps=steps, saves=saves,
        present=[[flag != 0 for flag in row] for row in present],
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16])),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(scenario):
    gen = torch.Generator().manual_seed(scenario["seed"])
    groups = []
    for hyper, shape_list in zip(scenario["groups"], scenario["layout"]):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(scenario["dtype"])) for s in shape_list]
        groups.append({"params": params, **hyper})
    opt = scenario["cls"]([dict(g) for g in groups], **scenario["path"])
    return [p for g in groups for p in g["params"]], opt


def _gradients(scenario, params, step):
    gen = torch.Generator().manual_seed(scenario["seed"] + 7919 * (step + 1))
    grads = [torch.randn(p.shape, generator=gen) * scenario["scale"] for p in params]
    return [g.to(p.dtype) if keep else None for g, p, keep in zip(grads, params, scenario["present"][step])]


def _check_invariants(params, opt, ever_had_grad):
    for group in opt.param_groups:
        for p in group["params"]:
            assert torch.isfinite(p).all(), "non-finite parameter"
            state = opt.state.get(p, {})
            assert bool(state) == ever_had_grad[p], "state exists exactly for parameters that had gradients"
            if not state:
                continue
            for key, expected in opt._expected_state_shapes(p, group).items():
                problem = _shape_mismatch(state.get(key), expected)
                assert problem is None, f"state[{key!r}] of shape {tuple(p.shape)}: {problem}"
            for key, value in state.items():
                for t in iter_state_tensors(value):
                    assert torch.isfinite(t).all(), key
                    if key != "step" and t.is_floating_point():
                        assert t.dtype == state_dtype(p), key


# Found by this test: shapes (1, 2, 2) and (2, 1, 2) both merge to (2, 2) and shared a bucket of the
# batched path, which then wrote the second one back in the first one's shape (RuntimeError).
_SAME_MERGED_SHAPE = dict(
    family="soap-batched", cls=SOAP, path=dict(foreach=True, fused=False),
    groups=[dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=0.0, shampoo_beta=-1, eps=1e-8, precondition_frequency=1,
                 max_precond_dim=2, merge_dims=merge, precondition_1d=False, normalize_grads=False,
                 correct_bias=False, one_sided=False, factorized=False) for merge in (False, True)],
    layout=[[(), ()], [(1, 2, 2), (2, 1, 2), (), (1, 2, 2)]], steps=3, saves=[2],
    present=[[False, False, True, True, False, False]] * 3, dtype=torch.float32, scale=1e-3, seed=0,
)


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
@example(scenario=_SAME_MERGED_SHAPE)
def test_resume_equals_uninterrupted_run(scenario):
    reference_params, reference = _build(scenario)
    params, opt = _build(scenario)
    ever = {p: False for p in reference_params}
    ever_resumed = {p: False for p in params}
    for step in range(scenario["steps"]):
        if step in scenario["saves"]:
            checkpoint = through_bytes({"params": [p.detach() for p in params], "opt": opt.state_dict()})
            params, opt = _build(scenario)  # fresh parameters (with the initial values) and optimizer
            with torch.no_grad():
                for p, saved in zip(params, checkpoint["params"]):
                    p.copy_(saved)
            opt.load_state_dict(checkpoint["opt"])
            ever_resumed = {p: had for p, had in zip(params, ever_resumed.values())}
        grads = _gradients(scenario, reference_params, step)
        for run_params, run_opt, seen in ((reference_params, reference, ever), (params, opt, ever_resumed)):
            for p, g in zip(run_params, grads):
                p.grad = None if g is None else g.clone()
                seen[p] = seen[p] or g is not None
            run_opt.step()
            _check_invariants(run_params, run_opt, seen)
        assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in reference_params], f"params, step {step}")
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(reference), "state")


def test_bucket_members_of_different_shapes_with_one_merged_shape():
    """merge_dims: a (6, 5) weight and a (2, 3, 5) tensor both merge to (6, 5) and are stepped in one
    bucket of the batched path; each must be written back in its own shape, as the one-parameter
    path does (float64: the two paths agree to rounding)."""
    runs = []
    for foreach in (None, False):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(6, 5), (2, 3, 5)]]
        opt = SOAP(params, merge_dims=True, max_precond_dim=6, precondition_frequency=2, foreach=foreach)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        runs.append(params)
    for batched, single in zip(*runs):
        assert batched.shape == single.shape
        torch.testing.assert_close(batched, single, rtol=0, atol=1e-10)
