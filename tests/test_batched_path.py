"""The batched path (same-shaped parameters stepped together) equals the one-parameter path."""
import pytest
import torch

from soap_optim import SOAP


def _flatten_state(state):
    out = {}
    for key, value in state.items():
        if isinstance(value, list):
            for index, entry in enumerate(value):
                if entry is not None:
                    out[f"{key}[{index}]"] = entry
        else:
            out[key] = value
    return out


def _run(shapes, dtype, steps, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    opt = SOAP(params, **kw)
    for t, step_grads in enumerate(grads):
        for index, (p, g) in enumerate(zip(params, step_grads)):
            # a matrix and a vector skip a step, so bucket members have different step counts
            p.grad = None if (index in (1, len(params) - 1) and t == 3) else g
        opt.step()
    return params, opt


# the vectors are stepped as one flat vector (unless preconditioned); the last one skips a step
SHAPES = [(6, 5), (6, 5), (6, 5), (5, 6), (4, 3, 2), (4, 3, 2), (3, 2, 2, 3), (7,), (12, 3), (3,), (1,), (5,)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize(
    "options",
    [
        dict(precondition_frequency=5),
        dict(precondition_frequency=4, normalize_grads=True, weight_decay=0.1, max_precond_dim=10),
        dict(precondition_frequency=6, one_sided=True, betas=(0.9, 0.99), correct_bias=False),
        dict(precondition_frequency=5, merge_dims=True, max_precond_dim=6, precondition_1d=True),
    ],
)
def test_batched_equals_per_parameter(options, dtype, tol):
    batched_params, batched = _run(SHAPES, dtype, 13, foreach=None, **options)
    single_params, single = _run(SHAPES, dtype, 13, foreach=False, **options)
    for pb, ps in zip(batched_params, single_params):
        torch.testing.assert_close(pb, ps, rtol=0, atol=tol)
        state_b, state_s = _flatten_state(batched.state[pb]), _flatten_state(single.state[ps])
        assert state_b.keys() == state_s.keys()
        for key in state_b:
            torch.testing.assert_close(state_b[key], state_s[key], rtol=0, atol=tol, msg=key)
    # two refreshes happened for the first parameter: 12 real steps at frequency <= 6
    assert float(batched.state[batched_params[0]]["step"]) == 12


def test_bf16_parameters_through_the_batched_path():
    params_b, opt_b = _run([(6, 5), (6, 5)], torch.bfloat16, 6, foreach=None)
    params_s, opt_s = _run([(6, 5), (6, 5)], torch.bfloat16, 6, foreach=False)
    for pb, ps in zip(params_b, params_s):
        assert pb.dtype == torch.bfloat16
        assert opt_b.state[pb]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(pb.float(), ps.float(), rtol=0, atol=1e-2)


def test_unpreconditioned_tensors_share_one_flat_buffer():
    """Vectors' moments become views of one buffer per step count (one op per stage), and every value
    stays equal to the one-parameter path."""
    params, opt = _run([(7,), (3,), (5,), (4,)], torch.float64, 6, foreach=None)
    single, _ = _run([(7,), (3,), (5,), (4,)], torch.float64, 6, foreach=False)
    for pb, ps in zip(params, single):
        torch.testing.assert_close(pb, ps, rtol=0, atol=1e-14)
    # vectors 1 and 3 skipped a step (see _run): the two same-step pairs each tile one buffer, in order
    rows = [opt.state[p]["exp_avg"] for p in params]
    for first, second in ((0, 2), (1, 3)):
        base = rows[first]._base
        assert base is not None and base.dim() == 1 and base.numel() == rows[first].numel() + rows[second].numel()
        assert rows[second]._base is base
        assert rows[first].storage_offset() == base.storage_offset()
        assert rows[second].storage_offset() == base.storage_offset() + rows[first].numel()
    assert rows[0]._base is not rows[1]._base
    assert [tuple(r.shape) for r in rows] == [(7,), (3,), (5,), (4,)]
