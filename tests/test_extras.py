"""extras: orthogonalize_grad_ and param_groups_for_weight_decay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from soap_optim.adam import AdamW
from soap_optim.extras import orthogonal_gradient, orthogonalize_grad_, param_groups_for_weight_decay

F64 = torch.float64


# ----------------------------------------------------------------- orthogonalize_grad_
@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4)])
def test_orthogonalized_grad_is_perpendicular_with_the_same_norm(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=F64)
    g = torch.randn(shape, generator=gen, dtype=F64) + 0.7 * w  # a clear component along w
    original = g.clone()
    result = orthogonalize_grad_(w, g)
    assert result is g
    assert abs(torch.dot(w.flatten(), g.flatten()).item()) < 1e-12 * w.norm().item() * g.norm().item()
    assert g.norm().item() == pytest.approx(original.norm().item(), rel=1e-14)
    # Closed form: g_perp = g - <w,g>/<w,w> w, rescaled to ||g||.
    perp = original - (torch.dot(w.flatten(), original.flatten()) / torch.dot(w.flatten(), w.flatten())) * w
    torch.testing.assert_close(g, perp * original.norm() / perp.norm(), atol=1e-14, rtol=0)


def test_zero_param_leaves_grad_unchanged():
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    original = g.clone()
    orthogonalize_grad_(torch.zeros(4, 3), g)
    assert torch.equal(g, original)


def test_grad_already_perpendicular_is_unchanged():
    w = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    g = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    orthogonalize_grad_(w, g)
    assert torch.equal(g, torch.tensor([0.0, 2.0, -1.0], dtype=F64))


def test_grad_parallel_to_param_becomes_zero():
    w = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    g = -3 * w.clone()
    orthogonalize_grad_(w, g)
    assert g.abs().max().item() < 1e-12


def test_low_precision_grad_is_updated_in_its_dtype():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=gen).to(torch.bfloat16)
    g = (torch.randn(8, 8, generator=gen) + w.float()).to(torch.bfloat16)
    orthogonalize_grad_(w, g)
    assert g.dtype == torch.bfloat16
    cosine = torch.dot(w.float().flatten(), g.float().flatten()) / (w.float().norm() * g.float().norm())
    assert abs(cosine.item()) < 1e-2


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        orthogonalize_grad_(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------- param_groups_for_weight_decay
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: an embedding, so not decayed
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_split_decayed_from_not_decayed():
    model = _Small()
    groups = param_groups_for_weight_decay(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, not_decayed = ({id(p) for p in g["params"]} for g in groups)
    assert decayed == {id(model.conv.weight), id(model.proj.weight)}
    assert not_decayed == {
        id(p) for p in (model.embed.weight, model.conv.bias, model.norm.weight, model.norm.bias, model.proj.bias,
                        model.scale)
    }
    # Every trainable parameter exactly once, in model.parameters() order.
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in listed} == {id(p) for p in trainable}
    for group in groups:
        order = [next(i for i, q in enumerate(trainable) if q is p) for p in group["params"]]
        assert order == sorted(order)
    # The groups are what an optimizer takes.
    AdamW(groups, lr=1e-3)


def test_param_groups_leave_out_empty_groups_and_check_weight_decay():
    assert [g["weight_decay"] for g in param_groups_for_weight_decay(nn.LayerNorm(4), 0.1)] == [0.0]
    with pytest.raises(ValueError, match="-1"):
        param_groups_for_weight_decay(nn.Linear(2, 2), -1.0)


# ----------------------------------------------------------------------------- orthograd as an option
from registry import OPTIMIZERS  # noqa: E402


def _orthogonal_part_float64(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w64, g64 = w.double().reshape(-1), g.double().reshape(-1)
    perpendicular = g64 - (w64 @ g64) / (w64 @ w64) * w64
    return (perpendicular * g64.norm() / perpendicular.norm()).reshape(g.shape)


@pytest.mark.parametrize("entry", [e for e in OPTIMIZERS if e.skip_reason is None], ids=lambda e: e.name)
def test_orthograd_option_equals_stepping_on_orthogonalized_gradients(entry):
    """orthograd=True (off by default) steps exactly as the same optimizer fed g_perp (computed by
    orthogonal_gradient, checked against a float64 formula here); the user's .grad is left as it is."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(5, 4), (4,)]]
    grads = [[torch.randn_like(w) for w in init] for _ in range(4)]
    with_option = [torch.nn.Parameter(w.clone()) for w in init]
    by_hand = [torch.nn.Parameter(w.clone()) for w in init]
    opt_option = entry.factory(with_option, **{**entry.hparams, "orthograd": True})
    opt_hand = entry.factory(by_hand, **entry.hparams)
    assert opt_hand.param_groups[0]["orthograd"] is False
    for step_grads in grads:
        for p, q, g in zip(with_option, by_hand, step_grads):
            p.grad = g.clone()
            q.grad = orthogonal_gradient(q.detach(), g)
            torch.testing.assert_close(q.grad, _orthogonal_part_float64(q.detach(), g), rtol=0, atol=1e-12)
        opt_option.step()
        opt_hand.step()
        for p, q, g in zip(with_option, by_hand, step_grads):
            assert torch.equal(p.grad, g)
            assert torch.equal(p.detach(), q.detach())
    assert not torch.equal(with_option[0].detach(), init[0])
