"""torch.compile and the optimizers.

* A ``torch.compile``d model trains with every optimizer configuration: with backend="eager" the run
  is bitwise the uncompiled one, with "aot_eager" and the default inductor backend it agrees to
  float tolerance.
* ``torch.compile(opt.step)``: the step is not one graph. Dynamo breaks the graph at every
  ``.item()``/``bool(tensor)`` (step counts, the non-finite gradient screen, the finiteness checks
  around eigh/QR) and at generators in the step; frames with a break inside a loop run eagerly. What
  matters here: compilation settles (no new frames or graph breaks after the first refresh cycle,
  i.e. no recompilation per step) and the compiled step computes exactly what the eager step does.
  Bitwise equality needs ``enable_dynamo_decompositions=False``: by default Dynamo rewrites
  ``Tensor.addcmul_(a, b, value=v)`` as ``copy_(fma(a * b, v, self))``, which rounds differently.
  Call ``zero_grad(set_to_none=False)`` with a compiled step: with ``set_to_none=True`` every step
  hands Dynamo new ``.grad`` tensors, whose guards then fail, and Adam's ``_step_group`` recompiles
  each step until the recompile limit (8) sends it back to eager.
* The batched SOAP step ops (``soap_optim.kernels.reference``: the path CPU tensors take) and the
  overflow guard compile with ``fullgraph=True`` (no graph break at all), recompiling once when the
  step count turns dynamic, and agree with eager bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import ENTRIES, entry_params, loss_at, make_model, params_of, train
from registry import assert_bitwise_equal, optimizer_snapshot

dynamo = torch._dynamo
counters = dynamo.utils.counters
# emitted by torch's own compile machinery on this torch version, not by soap_optim
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _by_name(*names):
    return entry_params([e for e in ENTRIES if e.name in names])


# ----------------------------------------------------------------------------- compiled models
def _train_compiled(entry, backend, steps):
    model = make_model()
    compiled = torch.compile(model, backend=backend)
    opt = entry.make(model.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_at(compiled, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("entry", entry_params())
def test_compiled_model_eager_backend_is_bitwise(entry):
    model, opt, losses = _train_compiled(entry, "eager", 10)
    reference = make_model()
    reference_opt = entry.make(reference.parameters())
    reference_losses = train(reference, reference_opt, 0, 10)
    assert losses == reference_losses
    assert_bitwise_equal(params_of(model), params_of(reference))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(reference_opt))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


@pytest.mark.parametrize("entry", _by_name("soap-default-impl", "soap", "shampoo", "adamw", "adafactor"))
def test_compiled_model_aot_eager(entry):
    model, opt, losses = _train_compiled(entry, "aot_eager", 10)
    reference = make_model()
    reference_losses = train(reference, entry.make(reference.parameters()), 0, 10)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


@pytest.mark.parametrize("entry", _by_name("soap-default-impl"))
def test_compiled_model_inductor(entry):
    """The default backend (C++ codegen on CPU; ~10 s of compilation the first time)."""
    model, opt, losses = _train_compiled(entry, "inductor", 20)
    reference = make_model()
    reference_losses = train(reference, entry.make(reference.parameters()), 0, 20)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    # fused kernels round differently; refreshes amplify it a little: measured 7e-4 relative
    assert abs(losses[-1] - reference_losses[-1]) < 1e-2 * reference_losses[-1], (losses[-1], reference_losses[-1])


# ----------------------------------------------------------------------------- compiled step
def _compiled_step_run(entry, steps=20):
    """(model, opt, per-step [frames, graphs, graph breaks]) for a torch.compile(opt.step) run."""
    model = make_model()
    opt = entry.make(model.parameters())
    step = torch.compile(opt.step, backend="eager")
    progress = []
    for t in range(steps):
        opt.zero_grad(set_to_none=False)
        loss_at(model, t).backward()
        step()
        progress.append(
            (counters["frames"]["total"], counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
        )
    return model, opt, progress


def _recompile_limit_hit() -> bool:
    return any("recompile limit" in key.lower() for key in counters["unimplemented"])


def _check_compiled_step(entry):
    with dynamo.config.patch(enable_dynamo_decompositions=False):
        model, opt, progress = _compiled_step_run(entry)
    frames, graphs, breaks = progress[-1]
    assert graphs > 0, "nothing was compiled"
    # settled after the first refresh cycle: nothing new compiled, no new graph breaks, in steps 10-20
    assert progress[9] == progress[-1], progress
    reference = make_model()
    reference_opt = entry.make(reference.parameters())
    for t in range(20):
        reference_opt.zero_grad(set_to_none=False)
        loss_at(reference, t).backward()
        reference_opt.step()
    assert_bitwise_equal(params_of(model), params_of(reference))
    assert_bitwise_equal(optimizer_snapshot(opt), optimizer_snapshot(reference_opt))
    return frames, graphs, breaks


@pytest.mark.parametrize("entry", _by_name("adam"))
def test_compiled_step_settles_and_is_bitwise(entry):
    frames, graphs, breaks = _check_compiled_step(entry)
    # measured 62, 6, 9 on one machine and 74, 3, 7 on another (Zen 4, this test alone, before and after
    # the distribution layer's rewrite); 98, 3, 7 in the full suite once the step skeleton also prunes the
    # layout records, estimates the memory of new state, notes what a failed step must undo and releases
    # idle bucket rows: the frame count depends on the machine and on what ran before (the skeleton
    # validates and screens in Python before the math); graphs and breaks are what must not grow
    assert frames <= 110 and graphs <= 8 and breaks <= 12, (frames, graphs, breaks)
    assert not _recompile_limit_hit()  # Adam steps a group at once: nothing is specialized per parameter


@pytest.mark.slow
@pytest.mark.parametrize("entry", entry_params([e for e in ENTRIES if e.name != "adam"]))
def test_compiled_step_settles_and_is_bitwise_all(entry):
    """As above for every configuration (SOAP: 5-10 s of tracing each). Measured (frames, graphs, graph
    breaks) after 20 steps, the same as after 5: SOAP 55/30/18, batched SOAP 100/59/25, one-sided
    factorized SOAP 65/31/25, Shampoo 83/56/16, Adafactor 27/15/5, per-parameter Adam 27/13/6.

    SOAP's and Shampoo's per-parameter code (what runs after the ``.item()`` of the step count) is
    specialized per parameter (guards on its identity and shapes): with this model's 6 parameters
    SOAP's per-parameter update frame needs more than Dynamo's recompile_limit (8) variants and falls
    back to eager, so a real model's compiled SOAP step runs that part eagerly."""
    frames, graphs, breaks = _check_compiled_step(entry)
    assert frames <= 150 and graphs <= 100 and breaks <= 60, (frames, graphs, breaks)


# ----------------------------------------------------------------------------- the batched step ops
def test_batched_step_ops_compile_fullgraph_and_settle():
    from torch._dynamo.testing import CompileCounter

    from soap_optim.eigenbasis import without_overflowing_grams
    from soap_optim.kernels import reference as ops

    def soap_step(grads, q_left, q_right, exp_avg, exp_avg_sq, params, left, right, t, beta1, beta2, lr):
        ops.factor_ema_(left, right, without_overflowing_grams(grads, batch_dims=1), beta2)
        direction = ops.rotate_adam_(grads, q_left, q_right, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=1e-8)
        step_size = torch.full((grads.shape[0],), lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))
        ops.unrotate_apply_(direction, q_left, q_right, params, step_size=step_size, decay=0.01 * lr)

    def elementwise_step(params, grads, exp_avg, exp_avg_sq, t):
        ops.adam_(params, grads, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.95, eps=1e-8,
                  step_size=1e-2 * math.sqrt(1 - 0.95**t) / (1 - 0.9**t), decay=1e-4)

    gen = torch.Generator().manual_seed(0)
    b, m, n = 3, 5, 4
    q_left = torch.linalg.qr(torch.randn(b, m, m, generator=gen))[0]
    q_right = torch.linalg.qr(torch.randn(b, n, n, generator=gen))[0]

    def bucket_state():
        params = torch.randn(b, m, n, generator=torch.Generator().manual_seed(1))
        return [torch.zeros(b, m, n), torch.zeros(b, m, n), params, torch.zeros(b, m, m), torch.zeros(b, n, n)]

    def elementwise_state():
        params = [torch.ones(4, 3), torch.ones(3)]
        return params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    soap_counter, elementwise_counter = CompileCounter(), CompileCounter()
    compiled_soap = torch.compile(soap_step, backend=soap_counter, fullgraph=True)  # a break would raise
    compiled_elementwise = torch.compile(elementwise_step, backend=elementwise_counter, fullgraph=True)
    compiled_state, eager_state = bucket_state(), bucket_state()
    compiled_el, eager_el = elementwise_state(), elementwise_state()
    with dynamo.config.patch(enable_dynamo_decompositions=False):
        for t in range(1, 21):
            grads = torch.randn(b, m, n, generator=gen)
            if t == 7:
                grads[1] *= 1e20  # the overflow guard's zeroing branch, inside the graph
            compiled_soap(grads, q_left, q_right, *compiled_state, t, 0.9, 0.95, 1e-2)
            soap_step(grads, q_left, q_right, *eager_state, t, 0.9, 0.95, 1e-2)
            el_grads = [torch.randn(p.shape, generator=gen) for p in compiled_el[0]]
            compiled_elementwise(*compiled_el[:1], el_grads, *compiled_el[1:], t)
            elementwise_step(*eager_el[:1], el_grads, *eager_el[1:], t)
    # one graph for t == 1, one more once the step count turns dynamic; none after that
    assert soap_counter.frame_count == 2 and elementwise_counter.frame_count == 2
    assert_bitwise_equal(compiled_state, eager_state)
    assert_bitwise_equal(compiled_el, eager_el)
    assert torch.isfinite(compiled_state[3]).all()
