"""The gradient screen's shortcut on one process (``gradient_check.squared_norm_bound``): on host tensors the
screen first sums every gradient's squared norm from one flat copy of the small ones, and decides from the sum
alone when it is finite and far below every threshold. It must decide exactly as the screen that looks at each
gradient: the same refusals with the same messages, the same overflow guards, the same bits."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from registry import OPTIMIZERS, assert_bitwise_equal, entry_params, optimizer_snapshot
from soap_optim import gradient_check

F32_MAX = torch.finfo(torch.float32).max


def test_the_bound_is_the_sum_of_the_squared_norms():
    """Against a float64 recomputation, with tensors on both sides of the flat copy's size rule (a 300 x 300
    tensor is reduced on its own); NaN or Inf anywhere makes it non-finite; device tensors get None."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 10.0 ** k for k, s in enumerate([(7, 5), (300, 300), (11,), (3, 4, 5)])]
    exact = sum(float(g.double().square().sum()) for g in grads)
    bound = gradient_check.squared_norm_bound(grads)
    assert bound.dtype == torch.float64 and bound.dim() == 0
    assert math.isclose(float(bound), exact, rel_tol=1e-5)
    assert float(bound) >= max(float(n) for n in gradient_check.squared_norms(grads)) * (1 - 1e-6)
    for bad in (math.nan, math.inf):
        for index in (0, 1):
            broken = [g.clone() for g in grads]
            broken[index].view(-1)[3] = bad
            assert not math.isfinite(float(gradient_check.squared_norm_bound(broken)))
    assert gradient_check.squared_norm_bound([torch.zeros(3, device="meta")]) is None
    assert gradient_check.squared_norm_bound([]) is None


def _run(entry, largest, shortcut, monkeypatch):
    """Three steps on three tensors whose largest gradient norm is ``largest`` in the last step: what it
    raised (type and message) or None, the values and state after, and the screen's inspection flag."""
    if not shortcut:
        monkeypatch.setattr(gradient_check, "squared_norm_bound", lambda grads: None)
    else:
        monkeypatch.undo()
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 4), (4,), (3, 3)]]
    opt = entry.make(params)
    outcome = None
    for step in range(3):
        scale = largest if step == 2 else 1.0
        for k, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g / g.norm() * (scale if k == 0 else min(scale, 1.0) * 0.5)
        try:
            opt.step()
        except FloatingPointError as error:
            outcome = str(error)
    return outcome, [p.detach().clone() for p in params], optimizer_snapshot(opt), opt._gradients_may_overflow


# norms below, around and above the second-moment / Gram bound (sqrt(max)/2 = 9.2e18) and each optimizer's limit
LARGEST = [1.0, 1e9, 2e18, 4.6e18, 5e18, 9.1e18, 9.3e18, 1e19, 1e25]


@pytest.mark.parametrize("largest", LARGEST)
@pytest.mark.parametrize("entry", entry_params(OPTIMIZERS))
def test_the_shortcut_decides_as_the_screen_of_each_gradient(entry, largest, monkeypatch):
    with_shortcut = _run(entry, largest, True, monkeypatch)
    without = _run(entry, largest, False, monkeypatch)
    assert with_shortcut[0] == without[0]
    assert with_shortcut[3] == without[3]
    assert_bitwise_equal(with_shortcut[1], without[1])
    assert_bitwise_equal(with_shortcut[2], without[2])
