"""Bucket pools (soap_optim.buckets): every member of a bucket keeps its row of one stacked buffer per
state entry whether it has a gradient or not, so that changing participation (mixture-of-experts routing,
LayerDrop, frozen layers) neither re-stacks the state every step nor leaves rows nobody uses."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import soap_optim.optimizer as base
from registry import SOAP_PATHS, iter_state_tensors
from soap_optim import SOAP

pytestmark = pytest.mark.skipif("batched" not in SOAP_PATHS, reason="the batched path needs soap_optim.kernels")


def _params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _random_grads(params, gen, share=0.5):
    active = (torch.rand(len(params), generator=gen) < share).tolist()
    for p, a in zip(params, active):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = g if a else None


def _held_over_own(opt) -> float:
    own, held = 0, {}
    for state in opt.state.values():
        for tensor in iter_state_tensors(state):
            own += tensor.numel() * tensor.element_size()
            held[(tensor.device, tensor.untyped_storage().data_ptr())] = tensor.untyped_storage().nbytes()
    return sum(held.values()) / own


def _layout(opt, params):
    """(storage, offset) of every state tensor, per parameter."""
    return [
        [(t.untyped_storage().data_ptr(), t.storage_offset()) for t in iter_state_tensors(opt.state[p])]
        for p in params
    ]


@pytest.mark.parametrize("options", [{}, {"factor_update": "kl"}, {"merge_dims": True, "max_precond_dim": 6}])
def test_members_keep_their_rows_whichever_take_part(options, monkeypatch):
    """Once every expert has stepped, random participation (refreshes of some members included) moves no
    state entry: each stays the same row of the same buffer, nothing is released or re-stacked, held
    storage is the state's own bytes; and the values follow the one-parameter path (float64 rounding)."""
    shapes = [(6, 6)] * 6 + [(2, 3, 6)] * 2 + [(5,)] * 4
    runs = []
    for foreach in (None, False):
        params = _params(shapes, dtype=torch.float64)
        opt = SOAP(params, lr=1e-2, precondition_frequency=3, foreach=foreach, fused=False, **options)
        for step in range(2):  # every member builds its state, then steps once with the others
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype)
            opt.step()
        layout = _layout(opt, params)
        released = []
        monkeypatch.setattr(base, "release_unused_rows", lambda groups, apart=(): released.append(1))
        gen = torch.Generator().manual_seed(7)
        for _ in range(12):
            _random_grads(params, gen)
            opt.step()
            if foreach is None:
                assert _layout(opt, params) == layout
                assert _held_over_own(opt) == 1.0
        monkeypatch.undo()
        if foreach is None:
            assert not released
        runs.append((params, opt))
    (batched, opt_b), (single, opt_s) = runs
    for pb, ps in zip(batched, single):
        torch.testing.assert_close(pb, ps, rtol=0, atol=1e-12)
        for tb, ts in zip(iter_state_tensors(opt_b.state[pb]), iter_state_tensors(opt_s.state[ps])):
            torch.testing.assert_close(tb, ts, rtol=1e-9, atol=1e-12)


def _break_state(opt, params, event):
    """What may leave rows of a pool unused between two steps; returns the (possibly new) optimizer and
    parameters."""
    if event == "pop":
        opt.state.pop(params[1])
        opt.state.pop(params[-1])
    elif event == "deepcopy":
        opt = copy.deepcopy(opt)
        params = [p for group in opt.param_groups for p in group["params"]]
    elif event == "load":
        saved = opt.state_dict()
        params = [nn.Parameter(p.detach().clone()) for p in params]
        opt = SOAP(params, lr=1e-2, precondition_frequency=3, fused=False)
        opt.load_state_dict(saved)
    elif event == "failed-step":  # the math of the first group ran (it may have re-stacked), then it fails
        for p in params:
            p.grad = torch.ones_like(p)
        original = SOAP._step_group

        def fails_after_the_math(self, *args):
            original(self, *args)
            raise RuntimeError("out of memory (injected)")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SOAP, "_step_group", fails_after_the_math)
            with pytest.raises(RuntimeError, match="injected"):
                opt.step()
    return opt, params


@pytest.mark.parametrize("event", ["none", "pop", "deepcopy", "load", "failed-step"])
def test_no_unused_rows_whatever_happens_to_the_state(event):
    """Mixed shapes (two matrix buckets, a 3-D one, vectors of two lengths), random participation, and
    between two steps an event that moves or drops state: held storage is the state's own bytes after
    every later step."""
    shapes = [(6, 6)] * 4 + [(6, 9)] * 4 + [(2, 3, 3)] * 3 + [(6,)] * 4 + [(9,)] * 2
    params = _params(shapes)
    opt = SOAP(params, lr=1e-2, precondition_frequency=3, fused=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(14):
        if step == 6:
            opt, params = _break_state(opt, params, event)
        _random_grads(params, gen)
        opt.step()
        assert _held_over_own(opt) == 1.0, step


def test_a_release_that_cannot_allocate_is_retried(monkeypatch):
    """Releasing unused rows allocates; if that fails (out of memory) the step is still taken, values
    unchanged, and the release runs again after the next step."""
    params = _params([(5, 5)] * 6)
    opt = SOAP(params, lr=1e-2, precondition_frequency=3, fused=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # every member in one pool
        _random_grads(params, gen, share=1.0)
        opt.step()
    real = base.release_unused_rows
    calls = []

    def out_of_memory(groups, apart=()):
        calls.append(1)
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(base, "release_unused_rows", out_of_memory)
    opt.state.pop(params[0])  # its rows are now unused
    before = [p.detach().clone() for p in params]
    _random_grads(params, gen, share=1.0)
    params[0].grad = None
    opt.step()  # no error: the step is taken
    assert calls and not torch.equal(params[1].detach(), before[1])
    assert _held_over_own(opt) > 1.0
    monkeypatch.setattr(base, "release_unused_rows", real)
    _random_grads(params, gen)
    opt.step()
    assert _held_over_own(opt) == 1.0


def test_members_that_keep_training_alone_get_pools_of_their_own():
    """Half the experts frozen for good: after STEADY_STEPS steps with the same members the trained ones are
    every row of pools of their own (stepped in place, no gathering), the frozen ones keep theirs in
    another, held storage stays the state's own bytes, and the values follow the one-parameter path."""
    from soap_optim.buckets import STEADY_STEPS

    runs = []
    for foreach in (None, False):
        params = _params([(6, 6)] * 8, dtype=torch.float64)
        opt = SOAP(params, lr=1e-2, precondition_frequency=3, foreach=foreach, fused=False)
        gen = torch.Generator().manual_seed(5)
        for step in range(4 + STEADY_STEPS + 3):
            _random_grads(params, gen, share=1.0)
            if step >= 4:  # the odd experts freeze
                for p in params[1::2]:
                    p.grad = None
            opt.step()
            if foreach is None:
                assert _held_over_own(opt) == 1.0, step
        runs.append((params, opt))
    (batched, opt_b), (single, _) = runs
    for key in ("exp_avg", "exp_avg_sq"):
        trained = [opt_b.state[p][key] for p in batched[0::2]]
        frozen = [opt_b.state[p][key] for p in batched[1::2]]
        assert trained[0]._base.shape[0] == len(trained) and all(t._base is trained[0]._base for t in trained)
        assert frozen[0]._base.shape[0] == len(frozen) and all(t._base is frozen[0]._base for t in frozen)
    for pb, ps in zip(batched, single):
        torch.testing.assert_close(pb, ps, rtol=0, atol=1e-12)
