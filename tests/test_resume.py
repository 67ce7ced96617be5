"""Exact resume from a checkpoint, for every optimizer configuration (tests/harness.py ENTRIES).

Train, ``torch.save`` the optimizer's state_dict (and the model's) to memory, ``torch.load`` it into a
fresh model and a fresh optimizer, continue: on CPU the result is the uninterrupted run bit for bit,
parameters and every state tensor, whether the checkpoint is taken just before, at or just after a
basis refresh (SOAP) or root recomputation (Shampoo). Also: SOAP's batched path, whose state tensors
are row views of stacked buffers; shape mismatches; loading onto another dtype or device.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import (
    SOAP_ENTRIES,
    entry_params,
    groups_without_params,
    make_model,
    params_of,
    refresh_calls,
    refreshed_key,
    serialized_size,
    through_bytes,
    train,
)
from registry import assert_bitwise_equal, iter_state_tensors, optimizer_snapshot, snapshot

TOTAL = 11  # step() calls in every run: SOAP refreshes at calls 4, 7, 10; Shampoo at 2, 5, 8, 11


def _save_point(entry, where: str) -> int:
    """Number of calls after which the checkpoint is taken."""
    refreshes = refresh_calls(entry, TOTAL)
    anchor = refreshes[1] if refreshes else 6  # the second refresh: the first one may coincide with warm-up
    return anchor + {"before": -1, "at": 0, "after": 1}[where]


def _uninterrupted(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    history = []  # refreshed state (bases/roots) after each call
    key = refreshed_key(entry)
    for call in range(1, TOTAL + 1):
        train(model, opt, call - 1, call)
        if key is not None:
            history.append([snapshot(opt.state[p][key]) for p in model.parameters()])
    return model, opt, history


@pytest.mark.parametrize("where", ["before", "at", "after"])
@pytest.mark.parametrize("entry", entry_params())
def test_resume_is_bitwise(entry, where):
    saved_after = _save_point(entry, where)
    reference, reference_opt, history = _uninterrupted(entry)

    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, saved_after)
    saved_state = optimizer_snapshot(opt)
    checkpoint = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    del model, opt

    fresh = make_model(seed=123)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = entry.make(fresh.parameters(), lr=5 * entry.hparams["lr"])  # the checkpoint's lr must win
    fresh_opt.load_state_dict(checkpoint["opt"])
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), saved_state, "loaded state")
    train(fresh, fresh_opt, saved_after, TOTAL)

    assert_bitwise_equal(params_of(fresh), params_of(reference), "params")
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), optimizer_snapshot(reference_opt), "state")
    assert groups_without_params(fresh_opt) == groups_without_params(reference_opt)
    assert float(fresh_opt.state[next(fresh.parameters())]["step"]) == float(
        reference_opt.state[next(reference.parameters())]["step"]
    )

    # the save point is where it claims to be: the refreshed state changed exactly at refresh calls
    refreshes = refresh_calls(entry, TOTAL)
    if refreshes:
        for call in range(2, TOTAL + 1):
            before, after = history[call - 2], history[call - 1]
            weight = 0  # first weight matrix: preconditioned on both sides in every configuration
            changed = not all(
                torch.equal(a, b) for a, b in zip(before[weight], after[weight]) if a is not None
            )
            assert changed == (call in refreshes), (call, refreshes)
        assert saved_after + {"before": 1, "at": 0, "after": -1}[where] in refreshes


_BUCKETED = [e for e in SOAP_ENTRIES if e.hparams.get("foreach") is not False and not e.hparams.get("factorized")]


def _grad_steps(params, opt, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(500 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("entry", entry_params(_BUCKETED))
def test_batched_state_views_serialize_once_and_resume(entry):
    """On the batched path two same-shaped weights' state tensors are rows of shared [2, ...] buffers.
    torch.save stores each buffer once (not once per view), the loaded state is independent of the
    source, and resuming from it is bitwise."""
    shapes = [(32, 24), (32, 24), (24,)]
    make = lambda: [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    params = make()
    opt = entry.make(params)
    _grad_steps(params, opt, 0, 5)
    w0, w1 = params[0], params[1]
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = opt.state[w0][key], opt.state[w1][key]
        assert a._base is not None and a._base is b._base, key  # rows of one stacked buffer
        assert a._base.shape == (2, 32, 24)
    for index in (0, 1):
        assert opt.state[w0]["bases"][index]._base is opt.state[w1]["bases"][index]._base

    # Views of one buffer are stored with it, once: as large as the same state made of separate tensors
    state_dict = opt.state_dict()
    separate = {**state_dict, "state": snapshot(state_dict["state"])}
    assert opt.state[w0]["exp_avg"]._base is not None  # state_dict() did not copy the live state
    size, separate_size = serialized_size(state_dict), serialized_size(separate)
    state_bytes = sum(t.nbytes for st in opt.state.values() for t in iter_state_tensors(st))
    assert state_bytes > 40_000
    assert state_bytes < size <= separate_size + 2_000, (size, separate_size, state_bytes)

    loaded = through_bytes(state_dict)
    fresh = make()
    for p, q in zip(fresh, params):
        p.data.copy_(q)
    fresh_opt = entry.make(fresh)
    fresh_opt.load_state_dict(loaded)
    source_before = optimizer_snapshot(opt)
    _grad_steps(fresh, fresh_opt, 5, 12)
    assert_bitwise_equal(optimizer_snapshot(opt), source_before, "source state")  # no aliasing
    _grad_steps(params, opt, 5, 12)
    assert_bitwise_equal([p.detach() for p in fresh], [p.detach() for p in params])
    assert_bitwise_equal(optimizer_snapshot(fresh_opt), optimizer_snapshot(opt))
    # and the fresh optimizer re-formed its bucket
    assert fresh_opt.state[fresh[0]]["exp_avg"]._base is fresh_opt.state[fresh[1]]["exp_avg"]._base


def test_resume_across_implementations_is_close():
    """A checkpoint of SOAP's batched path resumes on the one-parameter path (and vice versa); the
    two paths agree to float32 rounding, not bitwise (different reduction order)."""
    batched = next(e for e in SOAP_ENTRIES if e.name == "soap-default-impl")
    model = make_model()
    opt = batched.make(model.parameters())
    train(model, opt, 0, 6)
    checkpoint = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    single = make_model()
    single.load_state_dict(checkpoint["model"])
    single_opt = batched.make(single.parameters(), foreach=False)
    single_opt.load_state_dict(checkpoint["opt"])
    single_opt.param_groups[0]["foreach"] = False  # the loaded group carries foreach=None
    train(single, single_opt, 6, TOTAL)
    train(model, opt, 6, TOTAL)
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- shape mismatches
class _Shifted(nn.Module):
    """make_model with the middle layer's bias one longer (state of parameter 3 cannot fit)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ParameterList(
            [nn.Parameter(torch.randn(*s)) for s in [(4, 4), (4,), (4, 4), (5,), (3, 4), (3,)]]
        )


@pytest.mark.parametrize("entry", entry_params())
def test_shape_mismatch_raises_naming_the_parameter(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 3)
    checkpoint = through_bytes(opt.state_dict())

    target = _Shifted()
    target_opt = entry.make(target.parameters())
    with pytest.raises(ValueError) as info:
        target_opt.load_state_dict(checkpoint)
    message = str(info.value)
    assert "parameter 3 of param group 0" in message and "(5,)" in message, message
    assert len(target_opt.state) == 0  # nothing was loaded, not even the matching parameters 0-2
    assert target_opt.param_groups[0]["lr"] == entry.hparams["lr"]


# ----------------------------------------------------------------------------- other dtypes / devices
def _expected_cast(state, dtype):
    return {k: (v if k == "step" else _cast(v, dtype)) for k, v in state.items()}


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@pytest.mark.parametrize(
    "saved_dtype,target_dtype,state_dtype",
    [
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.float32, torch.float16, torch.float32),
        (torch.float64, torch.float32, torch.float32),
        (torch.float32, torch.float64, torch.float64),
    ],
    ids=["f32->bf16", "f32->f16", "f64->f32", "f32->f64"],
)
@pytest.mark.parametrize("entry", entry_params())
def test_load_onto_another_dtype(entry, saved_dtype, target_dtype, state_dtype):
    model = make_model(dtype=saved_dtype)
    opt = entry.make(model.parameters())
    train(model, opt, 0, 5)
    saved = [optimizer_snapshot(opt)[i] for i in range(len(list(model.parameters())))]
    checkpoint = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})

    target = make_model(dtype=target_dtype)
    target.load_state_dict(checkpoint["model"])
    target_opt = entry.make(target.parameters())
    target_opt.load_state_dict(checkpoint["opt"])
    loaded = optimizer_snapshot(target_opt)
    for index, (before, after) in enumerate(zip(saved, loaded)):
        # floating state in the target's state precision, each value rounded once from the saved one
        assert_bitwise_equal(after, _expected_cast(before, state_dtype), f"parameter {index}")
    train(target, target_opt, 5, 9)
    for state in target_opt.state.values():
        for key, value in state.items():
            for t in iter_state_tensors(value):
                if key != "step" and t.is_floating_point():
                    assert t.dtype == state_dtype, key
                assert torch.isfinite(t).all(), key
    assert all(p.dtype == target_dtype and torch.isfinite(p).all() for p in target.parameters())


@pytest.mark.parametrize("entry", entry_params())
def test_load_onto_meta_device(entry):
    """Device handling without a second real device: a CPU checkpoint loaded for parameters on the
    meta device gives meta state of the right shapes and dtypes (and no data is read back)."""
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 4)
    checkpoint = through_bytes(opt.state_dict(), map_location="cpu")
    with torch.device("meta"):
        target = make_model()
    target_opt = entry.make(target.parameters())
    target_opt.load_state_dict(checkpoint)
    for p, q in zip(model.parameters(), target.parameters()):
        src, dst = opt.state[p], target_opt.state[q]
        assert src.keys() == dst.keys()
        for key in src:
            for a, b in zip(iter_state_tensors(src[key]), iter_state_tensors(dst[key])):
                assert a.shape == b.shape and a.dtype == b.dtype, key
                if key != "step":
                    assert b.is_meta, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CPU -> CUDA resume")
@pytest.mark.parametrize("entry", entry_params())
def test_resume_on_cuda_from_cpu_checkpoint(entry):
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 0, 5)
    checkpoint = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()}, map_location="cuda")
    target = make_model().cuda()
    target.load_state_dict(checkpoint["model"])
    target_opt = entry.make(target.parameters())
    target_opt.load_state_dict(checkpoint["opt"])
    for state in target_opt.state.values():
        for key, value in state.items():
            for t in iter_state_tensors(value):
                assert t.is_cuda or key == "step", key

    def cuda_train(model, opt, start, stop):
        from harness import batch

        for step in range(start, stop):
            opt.zero_grad()
            x, y = batch(step)
            ((model(x.cuda()) - y.cuda()) ** 2).mean().backward()
            opt.step()

    cuda_train(target, target_opt, 5, TOTAL)
    train(model, opt, 5, TOTAL)
    for p, q in zip(model.parameters(), target.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=0, atol=1e-4)
