"""SOAP's ``refresh_tolerance``: a due refresh runs only where the basis drifted; the limits are the plain
schedules (every due refresh; no refresh at all)."""
import pytest
import torch

from soap_optim import SOAP


def _train(steps=12, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (6, 5), (4, 7), (5,)]]
    opt = SOAP(params, lr=0.05, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("foreach", [None, False])
def test_a_tiny_tolerance_refreshes_as_without_one(foreach):
    plain, _ = _train(precondition_frequency=2, foreach=foreach)
    tolerant, _ = _train(precondition_frequency=2, refresh_tolerance=1e-12, foreach=foreach)
    for a, b in zip(plain, tolerant):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [None, False])
def test_a_tolerance_above_any_drift_never_refreshes(foreach):
    never, never_opt = _train(precondition_frequency=100, foreach=foreach)
    # drift is at most 1, so a tolerance of 1 skips every refresh: the first bases stay, as with no refresh due
    tolerant, tolerant_opt = _train(precondition_frequency=1, refresh_tolerance=1.0, foreach=foreach)
    for a, b in zip(never, tolerant):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(never_opt.state[a]["bases"], tolerant_opt.state[b]["bases"]) if x is not None)


def test_a_moderate_tolerance_skips_some_refreshes_and_keeps_bases_orthonormal():
    every, every_opt = _train(precondition_frequency=1)
    some, some_opt = _train(precondition_frequency=1, refresh_tolerance=0.08)
    assert any(not torch.equal(a, b) for a, b in zip(every, some))
    for p in some:
        for basis in some_opt.state[p]["bases"]:
            if basis is not None:
                torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[0]), rtol=0, atol=1e-5)


def test_negative_tolerance_is_refused_before_anything_changes():
    param = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="refresh_tolerance"):
        SOAP([param], refresh_tolerance=-0.1)


def test_a_group_saved_with_the_removed_second_moment_rotation_is_refused_before_anything_changes():
    """Older checkpoints may carry rotate_second_moment in their param groups: False is the present
    behaviour and loads as is; True cannot be honoured and is refused by load_state_dict, naming the
    option, with the optimizer left as it was."""
    params, opt = _train(precondition_frequency=2)
    control_params, control = _train(precondition_frequency=2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["rotate_second_moment"] = False
    opt.load_state_dict(saved)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["rotate_second_moment"] = True
    with pytest.raises(ValueError, match="rotate_second_moment was removed"):
        opt.load_state_dict(saved)
    for p, q in zip(params + control_params, control_params + params):
        p.grad = torch.ones_like(p)
    opt.step()
    control.step()
    assert all(torch.equal(a, b) for a, b in zip(params, control_params))
