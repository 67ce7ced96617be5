"""The batched path (same-shaped parameters stepped together) equals the one-parameter path."""
import pytest
import torch

from registry import assert_bitwise_equal, optimizer_snapshot
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
        dict(precondition_frequency=1, refresh_tolerance=0.08),  # some bases refreshed, some kept, per step
        dict(precondition_frequency=3, refresh_tolerance=0.05),
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
    """Vectors' moments become views of one buffer (one op per stage), and every value stays equal to the
    one-parameter path. Vectors 1 and 3 skipped a step (see _run): the steps after it step them apart from
    0 and 2 (different step counts), yet all four keep their slices of the one buffer, in order (a step of
    some members gathers their slices and writes them back, see soap_optim.buckets)."""
    params, opt = _run([(7,), (3,), (5,), (4,)], torch.float64, 6, foreach=None)
    single, _ = _run([(7,), (3,), (5,), (4,)], torch.float64, 6, foreach=False)
    for pb, ps in zip(params, single):
        torch.testing.assert_close(pb, ps, rtol=0, atol=1e-14)
    for key in ("exp_avg", "exp_avg_sq"):
        rows = [opt.state[p][key] for p in params]
        base = rows[0]._base
        assert base is not None and base.dim() == 1 and base.numel() == sum(r.numel() for r in rows)
        offset = base.storage_offset()
        for row in rows:
            assert row._base is base and row.storage_offset() == offset
            offset += row.numel()
        assert [tuple(r.shape) for r in rows] == [(7,), (3,), (5,), (4,)]


# ----------------------------------------------------------------- parameters sharing one storage
def _shared_storage_run(shape, optimizer_factory, steps=6):
    """Two Parameters on one storage, each with its own gradient; returns the storage's final value."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(shape, dtype=torch.float64, generator=generator)
    w, v = torch.nn.Parameter(base), torch.nn.Parameter(base)
    assert w.data_ptr() == v.data_ptr() and w is not v
    opt = optimizer_factory([w, v])
    for _ in range(steps):
        w.grad = torch.randn(shape, dtype=torch.float64, generator=generator)
        v.grad = torch.randn(shape, dtype=torch.float64, generator=generator)
        opt.step()
    return w.detach().clone(), opt


@pytest.mark.parametrize("shape, options", [((4, 3), {}), ((4, 3), {"max_precond_dim": 1}), ((5,), {})])
def test_parameters_sharing_a_storage_get_both_updates_on_every_path(shape, options):
    # The batched paths step them one at a time through the one-parameter path: the same operations in
    # the same order as foreach=False, hence the same bits.
    single, _ = _shared_storage_run(shape, lambda ps: SOAP(ps, lr=0.1, foreach=False, **options))
    batched, _ = _shared_storage_run(shape, lambda ps: SOAP(ps, lr=0.1, **options))
    assert torch.equal(single, batched)


def test_parameters_sharing_a_storage_in_different_shapes_get_both_updates():
    """A matrix and a flat view of its storage go to different buckets (rotated matrices, elementwise); the
    batched path still steps them one after the other, as foreach=False does: the same bits."""

    def run(foreach):
        generator = torch.Generator().manual_seed(6)
        base = torch.randn(20, dtype=torch.float64, generator=generator)
        matrix, flat = torch.nn.Parameter(base.view(5, 4)), torch.nn.Parameter(base)
        opt = SOAP([matrix, flat], lr=0.1, foreach=foreach)
        for _ in range(4):
            matrix.grad = torch.randn(5, 4, dtype=torch.float64, generator=generator)
            flat.grad = torch.randn(20, dtype=torch.float64, generator=generator)
            opt.step()
        return base.clone(), opt

    single, single_opt = run(False)
    batched, batched_opt = run(None)
    assert torch.equal(single, batched)
    assert_bitwise_equal(optimizer_snapshot(batched_opt), optimizer_snapshot(single_opt))


@pytest.mark.parametrize("foreach", [True, False])
def test_parameters_sharing_a_storage_move_as_under_torch_adam(foreach):
    # With no preconditioned axis, eps ~ 0 and no decay, SOAP is torch's Adam one call late (its first
    # call only builds the preconditioner): both Adams apply both parameters' updates to the one storage.
    # The bias corrections enter differently (torch divides sqrt(v) by sqrt(bc2), SOAP scales the step),
    # and so does eps: the same tolerance as the one-parameter comparison in test_adam_equivalence.py.
    shape = (4, 3)
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(shape, dtype=torch.float64, generator=generator)
    grads = [(torch.randn(shape, dtype=torch.float64, generator=generator),
              torch.randn(shape, dtype=torch.float64, generator=generator)) for _ in range(7)]
    storage = base.clone()
    soap_params = [torch.nn.Parameter(storage), torch.nn.Parameter(storage)]
    torch_storage = base.clone()
    torch_params = [torch.nn.Parameter(torch_storage), torch.nn.Parameter(torch_storage)]
    soap = SOAP(soap_params, lr=0.01, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0, max_precond_dim=1)
    adam = torch.optim.Adam(torch_params, lr=0.01, betas=(0.9, 0.999), eps=1e-15, foreach=foreach)
    for p, g in zip(soap_params, grads[0]):
        p.grad = g.clone()
    soap.step()
    for pair in grads[1:]:
        for p, q, g in zip(soap_params, torch_params, pair):
            p.grad, q.grad = g.clone(), g.clone()
        soap.step()
        adam.step()
    assert (soap_params[0] - base).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(soap_params[0].detach(), torch_params[0].detach(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------- rank-deficient factors
def _rank_deficient_run(foreach, feedback, steps=7):
    """A Linear(3, 1) weight (right factor of rank < 3 for the first steps), bases refreshed every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    fixed = [torch.randn(1, 3, dtype=torch.float64) for _ in range(steps)]
    opt = SOAP(model.parameters(), lr=0.1, precondition_frequency=1, foreach=foreach)
    for step in range(steps):
        opt.zero_grad()
        if feedback:
            torch.nn.functional.mse_loss(model(x), y).backward()
        else:
            model.weight.grad = fixed[step].clone()
        opt.step()
    return model.weight.detach().clone(), opt.state[model.weight]


def test_rank_deficient_factor_gives_both_paths_the_same_bases():
    # Same gradients: the factors and bases go through the same batched operations on a batch of one, so
    # they agree bit for bit; the parameters differ by the rotations' rounding (matmul vs the fused twin).
    w_single, single = _rank_deficient_run(False, feedback=False)
    w_batched, batched = _rank_deficient_run(None, feedback=False)
    for key in ("factors", "bases"):
        for a, b in zip(single[key], batched[key]):
            assert torch.equal(a, b), key
    torch.testing.assert_close(w_single, w_batched, rtol=0, atol=64 * torch.finfo(torch.float64).eps)


def test_rank_deficient_factor_keeps_the_paths_together_in_training():
    # Gradients from the parameters: the rotations' rounding (~1e-16) reaches the factors, and the basis of
    # a null space amplifies it (~1e-9 after 7 steps, measured 1e-9 in the bases and 4e-11 in the weight);
    # picked independently (eigh/QR of different products), the two paths used to be 0.1 apart.
    w_single, _ = _rank_deficient_run(False, feedback=True)
    w_batched, _ = _rank_deficient_run(None, feedback=True)
    torch.testing.assert_close(w_single, w_batched, rtol=0, atol=1e-8)


def test_members_due_at_different_steps_refresh_together_as_alone():
    """Members of a bucket at different steps (mixture-of-experts routing) have their refreshes due at
    different calls; the due ones are refreshed as one gathered stack and written back to their rows:
    bit for bit the bases of the one-parameter path, which refreshes each member as a bucket of one."""

    def bases_after_routing(foreach):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 5, generator=generator)) for _ in range(8)]
        opt = SOAP(params, precondition_frequency=3, foreach=foreach, fused=False)
        for _ in range(30):
            routed = (torch.rand(8, generator=generator) < 0.5).tolist()
            for param, active in zip(params, routed):
                param.grad = torch.randn(6, 5, generator=generator) if active else None
            opt.step()
        return [opt.state[p]["bases"] for p in params], {int(opt.state[p]["step"]) for p in params}

    batched, steps = bases_after_routing(None)
    single, _ = bases_after_routing(False)
    assert len(steps) > 2  # the members did drift apart
    for member_batched, member_single in zip(batched, single):
        for a, b in zip(member_batched, member_single):
            assert torch.equal(a, b)
