"""SOAP's handling of bad input: invalid hyperparameters, sparse/complex tensors, non-finite
gradients and mismatched state dicts. Every rejection must leave the optimizer untouched."""
from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from registry import SOAP_PATHS, assert_bitwise_equal, iter_state_tensors, optimizer_snapshot, snapshot
from soap_optim import SOAP

# Tests that take steps run on every SOAP code path available here (see registry.SOAP_PATHS).
over_paths = pytest.mark.parametrize("path", list(SOAP_PATHS.values()), ids=list(SOAP_PATHS))
SINGLE = SOAP_PATHS["single"]


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


# ----------------------------------------------------------------------------- hyperparameters
BAD_HYPERPARAMETERS = [
    # (kwarg, bad value, substrings the message must contain)
    ("lr", -1e-3, ["lr", "-0.001"]),
    ("lr", -1, ["lr", "-1"]),
    ("lr", float("nan"), ["lr", "nan"]),
    ("lr", float("inf"), ["lr", "inf"]),
    ("lr", torch.tensor([0.1, 0.2]), ["lr"]),
    ("lr", "0.1", ["lr"]),
    ("betas", (1.0, 0.9), ["beta", "index 0", "1.0"]),
    ("betas", (-0.1, 0.9), ["beta", "index 0", "-0.1"]),
    ("betas", (0.9, 1.0), ["beta", "index 1", "1.0"]),
    ("betas", (0.9, 1.5), ["beta", "index 1", "1.5"]),
    ("betas", (0.9, -1e-3), ["beta", "index 1", "-0.001"]),
    ("betas", (0.9, float("nan")), ["beta", "index 1", "nan"]),
    ("betas", 0.9, ["betas", "pair", "0.9"]),
    ("betas", (0.9,), ["betas", "pair"]),
    ("betas", (0.9, 0.99, 0.999), ["betas", "pair"]),
    ("betas", "ab", ["betas"]),
    ("eps", -1e-8, ["eps", "-1e-08"]),
    ("eps", float("nan"), ["eps", "nan"]),
    ("weight_decay", -0.1, ["weight_decay", "-0.1"]),
    ("weight_decay", float("inf"), ["weight_decay", "inf"]),
    ("precondition_frequency", 0, ["precondition_frequency", "0"]),
    ("precondition_frequency", -3, ["precondition_frequency", "-3"]),
    ("precondition_frequency", 2.5, ["precondition_frequency", "2.5"]),
    ("precondition_frequency", 10.0, ["precondition_frequency", "10.0"]),
    ("precondition_frequency", "10", ["precondition_frequency", "10"]),
    ("precondition_frequency", True, ["precondition_frequency", "True"]),
    ("max_precond_dim", -1, ["max_precond_dim", "-1"]),
    ("max_precond_dim", -5, ["max_precond_dim", "-5"]),
    ("max_precond_dim", 3.0, ["max_precond_dim", "3.0"]),
    ("data_format", "NHWC", ["data_format", "NHWC"]),
    ("data_format", "channels-last", ["data_format", "channels-last"]),
    ("data_format", None, ["data_format", "None"]),
    ("shampoo_beta", 1.0, ["shampoo_beta", "1.0"]),
    ("shampoo_beta", 1.5, ["shampoo_beta", "1.5"]),
    ("shampoo_beta", float("nan"), ["shampoo_beta"]),
    ("merge_dims", "yes", ["merge_dims", "yes"]),
    ("precondition_1d", 1, ["precondition_1d", "1"]),
    ("normalize_grads", None, ["normalize_grads", "None"]),
    ("correct_bias", "False", ["correct_bias", "False"]),
    ("maximize", 0, ["maximize", "0"]),
]


@pytest.mark.parametrize(
    "kwarg,bad,substrings", BAD_HYPERPARAMETERS, ids=[f"{k}={b!r}" for k, b, _ in BAD_HYPERPARAMETERS]
)
def test_bad_hyperparameter_raises_naming_it(kwarg, bad, substrings):
    params = _params([(3, 4)])
    with pytest.raises(ValueError) as info:
        SOAP(params, **{kwarg: bad})
    message = str(info.value)
    for s in substrings:
        assert s in message, f"{s!r} not in {message!r}"
    # the same check applies to groups added later, which are rolled back
    opt = SOAP(params)
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": _params([(2,)], seed=5), kwarg: bad})
    for s in substrings:
        assert s in str(info.value)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.0),
        dict(betas=(0.0, 0.0)),
        dict(betas=[0.5, 0.999]),
        dict(eps=0.0, weight_decay=0.0),
        dict(shampoo_beta=0.0),
        dict(shampoo_beta=-1),
        dict(shampoo_beta=-0.5),
        dict(shampoo_beta=0.999),
        dict(precondition_frequency=1, max_precond_dim=1),
        dict(data_format="channels_last", merge_dims=True),
        dict(lr=torch.tensor(0.01)),
    ],
)
@over_paths
def test_boundary_values_are_accepted(kwargs, path):
    params = _params([(3, 4), (2, 2, 2, 2)])
    opt = SOAP(params, **kwargs, **path)
    for grads in _grads([(3, 4), (2, 2, 2, 2)], 3):
        _set_grads(params, grads)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.skipif("batched" not in SOAP_PATHS, reason="SOAP's batched path is not available here")
def test_decay_above_one_accepted_by_every_path():
    """Only weight_decay >= 0 is required, so lr * weight_decay > 1 is valid at construction; every code
    path must then step with it (here: the batched path must agree with the one-parameter path), and
    must in no case half-update the state before raising."""
    shapes = [(4, 4), (4, 4)]
    grads = _grads(shapes, 4, seed=11)
    results = {}
    for name in ("single", "batched"):
        params = _params(shapes, seed=2)
        opt = SOAP(params, lr=1.0, weight_decay=1.5, precondition_frequency=2, **SOAP_PATHS[name])
        for t, step_grads in enumerate(grads):
            _set_grads(params, step_grads)
            params_before, state_before = [p.detach().clone() for p in params], optimizer_snapshot(opt)
            try:
                opt.step()
            except ValueError as error:
                state_after = optimizer_snapshot(opt)
                changed = [
                    f"param {i} state[{k!r}]"
                    for i, (a, b) in enumerate(zip(state_after, state_before))
                    for k in a
                    if not all(torch.equal(x, y) for x, y in zip(_tensors(a[k]), _tensors(b[k])))
                ]
                pytest.fail(
                    f"{name} path: step {t} with lr * weight_decay = 1.5 raised {error!r}; "
                    f"modified before raising: {changed or 'nothing'}"
                )
        results[name] = [p.detach().clone() for p in params]
    for a, b in zip(results["single"], results["batched"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# ----------------------------------------------------------------------------- sparse / complex
def test_sparse_gradient_assigned_directly():
    params = _params([(3, 4), (5, 2)])
    opt = SOAP(params, precondition_frequency=2, **SINGLE)
    for grads in _grads([(3, 4), (5, 2)], 2):
        _set_grads(params, grads)
        opt.step()
    params_before, state_before = snapshot(list(params)), optimizer_snapshot(opt)
    params[0].grad = torch.randn(3, 4)
    params[1].grad = torch.sparse_coo_tensor(
        torch.tensor([[0, 4], [1, 0]]), torch.tensor([1.0, -2.0]), (5, 2), check_invariants=True
    )
    with pytest.raises(ValueError, match="sparse") as info:
        opt.step()
    assert "(5, 2)" in str(info.value)
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in params_before])
    assert_bitwise_equal(optimizer_snapshot(opt), state_before)


def test_sparse_embedding_gradient():
    emb = nn.Embedding(10, 3, sparse=True)
    head = nn.Linear(3, 1)
    opt = SOAP(list(emb.parameters()) + list(head.parameters()), **SINGLE)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    head(emb(torch.tensor([1, 2, 7]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0
    for p, b in zip(opt.param_groups[0]["params"], before):
        assert_bitwise_equal(p.detach(), b)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameter_rejected_at_construction(dtype):
    real = nn.Parameter(torch.randn(2, 2))
    cplx = nn.Parameter(torch.randn(3, 2, dtype=dtype))
    with pytest.raises(ValueError, match="complex") as info:
        SOAP([real, cplx])
    assert "(3, 2)" in str(info.value)
    opt = SOAP([real])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1
    # nothing of the rejected group lingers: the real parameter still trains alone
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2))]})
    assert len(opt.param_groups) == 2


def test_integer_parameter_rejected():
    with pytest.raises(ValueError, match="floating"):
        SOAP([torch.zeros(3, dtype=torch.int64)])


# ----------------------------------------------------------------------------- non-finite gradients
SHAPES = [(3, 4), (5,), (2, 3, 2), (3, 4)]
FREQ = 3


def _fresh(path):
    params = _params(SHAPES)
    opt = SOAP(params, lr=0.02, betas=(0.9, 0.95), precondition_frequency=FREQ, precondition_1d=True, **path)
    return params, opt


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("good_steps", [0, 2, FREQ], ids=["first-step", "later-step", "refresh-step"])
@pytest.mark.parametrize("bad_index", [1, 2, 3])
@over_paths
def test_non_finite_gradient_changes_nothing(bad_value, good_steps, bad_index, path):
    total = good_steps + 4
    grads = _grads(SHAPES, total)
    params, opt = _fresh(path)
    control_params, control = _fresh(path)

    for t in range(good_steps):
        _set_grads(params, grads[t])
        opt.step()
        _set_grads(control_params, grads[t])
        control.step()
    params_before = [p.detach().clone() for p in params]
    state_before = optimizer_snapshot(opt)
    groups_before = snapshot(_groups_without_params(opt))
    if good_steps == FREQ:
        # the step about to fail would have refreshed the bases: state['step'] would reach FREQ
        assert all(opt.state[p]["step"].item() == FREQ - 1 for p in params)

    poisoned = [g.clone() for g in grads[good_steps]]
    flat = poisoned[bad_index].view(-1)
    flat[-1] = bad_value
    _set_grads(params, poisoned)
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    assert str(SHAPES[bad_index]) in str(info.value)
    assert_bitwise_equal([p.detach() for p in params], params_before)
    assert_bitwise_equal(optimizer_snapshot(opt), state_before)
    assert_bitwise_equal(snapshot(_groups_without_params(opt)), groups_before)
    if good_steps == 0:
        assert len(opt.state) == 0

    # training continues normally: identical to a run that never saw the bad gradient
    for t in range(good_steps, total):
        _set_grads(params, grads[t])
        opt.step()
        _set_grads(control_params, grads[t])
        control.step()
    for p, q, b in zip(params, control_params, params_before):
        assert_bitwise_equal(p.detach(), q.detach())
        assert not torch.equal(p.detach(), b)
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(control))


def test_non_finite_gradient_in_bf16_parameter():
    params = [nn.Parameter(torch.randn(4, 3).bfloat16()), nn.Parameter(torch.randn(6).bfloat16())]
    opt = SOAP(params, precondition_1d=True, **SINGLE)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before, state_before = [p.detach().clone() for p in params], optimizer_snapshot(opt)
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn_like(params[1])
    params[1].grad[3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"\(6,\)"):
        opt.step()
    assert_bitwise_equal([p.detach() for p in params], before)
    assert_bitwise_equal(optimizer_snapshot(opt), state_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [1, 7, 1000, 5003])
def test_non_finite_entry_detected_anywhere(dtype, size):
    """One bad entry at the start, middle or end of gradients of various sizes and dtypes, also
    next to huge finite entries and with +Inf and -Inf together, is always caught."""
    gen = torch.Generator().manual_seed(size)
    big = torch.finfo(dtype).max / 4
    for position in sorted({0, size // 2, size - 1}):
        for values in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")], [float("nan"), big]):
            if len(values) > size:
                continue
            params = [nn.Parameter(torch.randn(3, 2, generator=gen).to(dtype)),
                      nn.Parameter(torch.randn(size, generator=gen).to(dtype))]
            opt = SOAP(params, **SINGLE)
            params[0].grad = torch.randn(3, 2, generator=gen).to(dtype)
            grad = torch.randn(size, generator=gen).to(dtype)
            for offset, value in enumerate(values):
                grad[(position + offset) % size] = value
            params[1].grad = grad
            with pytest.raises(FloatingPointError, match=re.escape(f"({size},)")):
                opt.step()
            assert len(opt.state) == 0


@pytest.mark.parametrize("path", list(SOAP_PATHS.values()), ids=list(SOAP_PATHS))
def test_huge_finite_gradients_are_not_rejected(path):
    """Finite gradients whose norm overflows the gradient dtype (float16 entries near its max) are finite:
    the step must be taken; so must float32 entries of 1e18 (norm 3e18, under the sqrt(max)/2 ~ 9.2e18
    above which a second moment's squares could overflow)."""
    half = nn.Parameter(torch.randn(4, 4).half())
    single = nn.Parameter(torch.randn(3, 3))
    opt = SOAP([half, single], lr=0.01, **path)
    gen = torch.Generator().manual_seed(0)
    before = half.detach().clone()
    for _ in range(3):
        half.grad = (6e4 * torch.randn(4, 4, generator=gen).sign()).half()
        single.grad = 1e18 * torch.randn(3, 3, generator=gen).sign()
        assert not torch.isfinite(torch.linalg.vector_norm(half.grad))  # the norm overflows float16
        opt.step()
    assert opt.state[half]["step"].item() == 2 and opt.state[single]["step"].item() == 2
    assert all(torch.isfinite(t).all() for t in iter_state_tensors(opt.state[half]))
    assert torch.isfinite(half).all() and not torch.equal(half.detach(), before)


def test_non_finite_loss_in_closure():
    """A closure producing NaN gradients: the loss is evaluated, the step is refused."""
    model = nn.Linear(3, 2)
    opt = SOAP(model.parameters(), **SINGLE)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match=r"\(2, 3\)"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert_bitwise_equal(p.detach(), b)
    assert len(opt.state) == 0


# ----------------------------------------------------------------------------- load_state_dict
def _trained(shapes, steps=3, seed=0, **kwargs):
    params = _params(shapes, seed=seed)
    opt = SOAP(params, **{"precondition_frequency": 2, "precondition_1d": True, **SINGLE, **kwargs})
    for grads in _grads(shapes, steps, seed=seed + 1):
        _set_grads(params, grads)
        opt.step()
    return params, opt


def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(
    "saved_shapes,target_shapes,bad_shape",
    [
        ([(3, 4), (3,)], [(3, 4), (4,)], (4,)),          # second parameter differs: first must not be loaded
        ([(3, 4), (3,)], [(3, 5), (3,)], (3, 5)),
        ([(3, 4), (3,)], [(4, 3), (3,)], (4, 3)),        # same numel, transposed
        ([(2, 3, 4), (3,)], [(2, 4, 3), (3,)], (2, 4, 3)),
        ([(3, 4), (3, 4), (3,)], [(3, 4), (3, 4), (2,)], (2,)),
    ],
)
@over_paths
def test_load_state_dict_shape_mismatch(saved_shapes, target_shapes, bad_shape, path):
    _, source = _trained(saved_shapes, steps=3, **path)
    saved = _through_bytes(source.state_dict())
    target_params, target = _trained(target_shapes, steps=2, seed=3, **path)
    state_before = optimizer_snapshot(target)
    groups_before = snapshot(_groups_without_params(target))
    with pytest.raises(ValueError) as info:
        target.load_state_dict(saved)
    message = str(info.value)
    assert str(bad_shape) in message, message
    assert f"parameter {target_shapes.index(bad_shape)}" in message
    assert_bitwise_equal(optimizer_snapshot(target), state_before)
    assert_bitwise_equal(snapshot(_groups_without_params(target)), groups_before)
    assert all(p in target.state for p in target_params)
    # the optimizer still works afterwards
    _set_grads(target_params, _grads(target_shapes, 1, seed=9)[0])
    target.step()


def test_load_state_dict_into_fresh_optimizer_mismatch_leaves_it_empty():
    _, source = _trained([(3, 4), (3,)])
    params = _params([(3, 4), (6,)])
    target = SOAP(params, **SINGLE, precondition_frequency=10)  # not the source's 2: the groups must stay
    with pytest.raises(ValueError, match=r"\(6,\)"):
        target.load_state_dict(_through_bytes(source.state_dict()))
    assert len(target.state) == 0
    assert target.param_groups[0]["precondition_frequency"] == 10


def test_load_state_dict_different_number_of_groups():
    _, source = _trained([(3, 4), (3,)])
    params = _params([(3, 4), (3,)])
    target = SOAP([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}])
    groups_before = snapshot(_groups_without_params(target))
    with pytest.raises(ValueError, match="group"):
        target.load_state_dict(_through_bytes(source.state_dict()))
    assert len(target.state) == 0
    assert_bitwise_equal(snapshot(_groups_without_params(target)), groups_before)


def test_load_state_dict_different_number_of_params():
    _, source = _trained([(3, 4), (3,)])
    target_params, target = _trained([(3, 4), (3,), (2,)], steps=2, seed=4)
    state_before = optimizer_snapshot(target)
    with pytest.raises(ValueError, match="parameters"):
        target.load_state_dict(_through_bytes(source.state_dict()))
    assert_bitwise_equal(optimizer_snapshot(target), state_before)
