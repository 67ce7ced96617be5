"""Which axes get a factor: merge_dims, max_precond_dim, 1-D and 0-D handling, channels_last."""
import pytest
import torch

from soap_optim.eigenbasis import make_plan, merge_shape


@pytest.mark.parametrize(
    "shape,merged",
    [
        ((2, 3, 4, 5), (6, 4, 5)),
        ((6, 5, 3, 3), (6, 5, 9)),
        ((3, 3, 3, 3), (9, 9)),
        ((2, 5, 3, 3), (10, 9)),
        ((16, 12), (16, 12)),
        ((2, 20, 3), (2, 20, 3)),
        ((20, 1, 1), (20,)),
        ((1, 20), (20,)),
        ((), (1,)),
        ((1, 1), (1,)),
        ((11, 2, 5), (11, 10)),
    ],
)
def test_merge_shape_examples(shape, merged):
    assert merge_shape(shape, 10) == merged


def _plan(shape, **kw):
    options = dict(max_precond_dim=10, merge_dims=False, precondition_1d=False)
    options.update(kw)
    return make_plan(shape, **options)


def test_axes_above_max_precond_dim_are_left_alone():
    plan = _plan((16, 8))
    assert plan.merged_shape == (16, 8)
    assert plan.preconditioned == (False, True)
    assert plan.factor_dims == (None, 8)


def test_no_axis_qualifies_means_adam():
    assert not _plan((11, 12)).is_preconditioned


def test_one_dimensional_tensors():
    assert _plan((4,)).preconditioned == (False,)
    assert _plan((4,), precondition_1d=True).preconditioned == (True,)
    assert _plan((16,), precondition_1d=True).preconditioned == (False,)
    # merge_dims never touches a 1-D tensor
    assert _plan((16,), merge_dims=True).merged_shape == (16,)


def test_scalars():
    assert _plan(()).merged_shape == () and not _plan(()).is_preconditioned
    plan = _plan((), merge_dims=True)
    assert plan.merged_shape == (1,) and plan.preconditioned == (True,)


def test_empty_tensor_is_not_preconditioned():
    assert not _plan((0, 5)).is_preconditioned


def test_channels_last_permutes_before_merging():
    plan = _plan((6, 3, 3, 5), merge_dims=True, data_format="channels_last")
    # (O, H, W, I) -> (O, I, H, W) = (6, 5, 3, 3) -> [6, 5, 9]
    assert plan.merged_shape == (6, 5, 9)
    x = torch.arange(6 * 3 * 3 * 5.0).reshape(6, 3, 3, 5)
    merged = plan.to_merged(x)
    assert torch.equal(merged, x.permute(0, 3, 1, 2).reshape(6, 5, 9))
    assert torch.equal(plan.from_merged(merged), x)


def test_channels_last_without_merge_dims_is_ignored():
    plan = _plan((6, 3, 3, 5), data_format="channels_last")
    assert plan.permutation is None and plan.merged_shape == (6, 3, 3, 5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (), (3, 1, 4)])
def test_merge_round_trip(shape):
    plan = _plan(shape, merge_dims=True)
    x = torch.randn(shape)
    assert torch.equal(plan.from_merged(plan.to_merged(x)), x)
