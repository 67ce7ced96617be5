"""Host synchronizations per step: reads of device data by the host, which make the optimizer wait for the
GPU (for backward to finish) and leave the GPU idle meanwhile.

Counted on the CPU, where every tensor is a host tensor, by following where data comes from: a
``TorchDispatchMode`` marks the parameters, gradients and optimizer state (not the ``step`` counters,
which live on the host as in torch.optim) as device data and every result computed from device data
as device data too; a host read of device data is a synchronization. Host reads are what
``.item()``, ``bool()``, ``float()`` dispatch to (``aten._local_scalar_dense``), plus ``.tolist()`` and
``.cpu()``, which on a CPU tensor never reach the dispatcher and are therefore watched directly (on a
GPU ``.cpu()`` is the copy that waits; the ``.tolist()`` of its host result then costs nothing, so a
host read ends the data's device origin).
"""
from __future__ import annotations

from typing import List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo


class HostReadCounter(TorchDispatchMode):
    """Counts host reads of device data (see the module docstring); ``reads`` lists each read's kind."""

    def __init__(self, device_tensors):
        super().__init__()
        self.device = WeakIdKeyDictionary()
        for tensor in device_tensors:
            self.device[tensor] = True
        self.reads: List[str] = []

    def _from_device(self, tensors) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self.device for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs, _ = tree_flatten((args, kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if self._from_device(inputs):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append("item/bool")
            else:
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor):
                        self.device[tensor] = True
        return out

    def host_read(self, kind: str, tensor: torch.Tensor) -> bool:
        if tensor in self.device:
            self.reads.append(kind)
            return True
        return False


@pytest.fixture
def count_host_reads(monkeypatch):
    """A factory: ``count_host_reads(optimizer)`` -> (context manager, counter) for one step."""
    counters = []
    real_tolist, real_cpu = torch.Tensor.tolist, torch.Tensor.cpu

    def tolist(self):
        for counter in counters:
            counter.host_read(".tolist()", self)
        return real_tolist(self)

    def cpu(self, *args, **kwargs):
        result = real_cpu(self, *args, **kwargs)
        for counter in counters:
            if counter.host_read(".cpu()", self) and result is self:
                with torch.utils._python_dispatch._disable_current_modes():
                    result = self.clone()  # a host copy: no longer device data
        return result

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)

    def make(optimizer):
        tensors = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                tensors.append(p)
                if p.grad is not None:
                    tensors.append(p.grad)
                for key, value in optimizer.state.get(p, {}).items():
                    if key == "step":
                        continue
                    for entry in tree_flatten(value)[0]:
                        if isinstance(entry, torch.Tensor):
                            tensors.append(entry)
        counter = HostReadCounter(tensors)
        counters.clear()
        counters.append(counter)
        return counter

    yield make
    counters.clear()


# A small model's parameter set: a bucket of matrices, a 3-D tensor, vectors, a conv weight.
SHAPES = [(24, 16), (24, 16), (16, 24), (4, 6, 8), (16,), (24,), (8, 3, 3, 3)]
OPTIMIZERS = {
    "SOAP": (SOAP, dict(precondition_frequency=3)),
    "SOAP-one-parameter": (SOAP, dict(precondition_frequency=3, foreach=False)),
    "Shampoo": (Shampoo, dict(precondition_frequency=3)),
    "AdamW": (AdamW, dict()),
    "Adam-single-tensor": (Adam, dict(foreach=False)),
    "Adafactor": (Adafactor, dict()),
    "SOAP-refresh-tolerance": (SOAP, dict(precondition_frequency=3, refresh_tolerance=1e-3)),
    "Shampoo-roots": (Shampoo, dict(precondition_frequency=3, start_preconditioning_step=1)),
}
# Host reads of device data per step, as measured (first step, steps 2-5, where step 4 refreshes SOAP's
# and Shampoo's preconditioners): the gradient screen's one read of the squared norms, every step, first
# and refresh steps included (the eigenbasis core's fallbacks and Shampoo's roots are decided on the
# device, see soap_optim/eigenbasis/bases.py). One documented exception: a refresh with
# refresh_tolerance > 0 reads each stack's drift decisions once per preconditioned axis (that read lets
# settled bases skip their QR).
EXPECTED_PLAIN_STEP = 1
EVERY_STEP_ONCE = [
    "Adafactor", "Adam-single-tensor", "AdamW", "SOAP", "SOAP-one-parameter", "Shampoo", "Shampoo-roots"
]


def _run(name, count_host_reads, steps=5):
    cls, options = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = cls(params, **options)
    per_step = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        counter = count_host_reads(opt)
        with counter:
            opt.step()
        per_step.append(counter.reads)
    return per_step


@pytest.mark.parametrize("name", EVERY_STEP_ONCE)
def test_every_step_reads_device_data_once(name, count_host_reads):
    """First steps (SOAP's first bases by eigh) and refresh steps (QR) included."""
    per_step = _run(name, count_host_reads)
    assert [len(reads) for reads in per_step] == [EXPECTED_PLAIN_STEP] * len(per_step), per_step


def test_refresh_tolerance_reads_each_stack_and_axis_once(count_host_reads):
    per_step = _run("SOAP-refresh-tolerance", count_host_reads)
    # one read per (bucket, preconditioned axis) of SHAPES: 11 here
    assert [len(reads) for reads in per_step] == [1, 1, 1, 1 + 11, 1], per_step
    assert per_step[3].count(".tolist()") == 11


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_plain_steps_read_device_data_once(name, count_host_reads):
    per_step = _run(name, count_host_reads)
    refresh_steps = {3} if name.startswith(("SOAP", "Shampoo")) else set()  # the 4th call refreshes
    for index, reads in enumerate(per_step):
        if index == 0 or index in refresh_steps:
            continue
        assert len(reads) == EXPECTED_PLAIN_STEP, (index, reads)


def test_the_counter_sees_item_tolist_and_bool(count_host_reads):
    """The counter has teeth: each kind of host read of device data is counted, reads of host data
    (the step counters) are not."""
    param = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    opt = AdamW([param])
    opt.step()
    counter = count_host_reads(opt)
    with counter:
        derived = param.grad * 2
        derived.sum().item()
        derived.tolist()
        bool(derived.abs().max() > 0)
        derived.cpu().tolist()  # one read: the host copy is not device data
        opt.state[param]["step"].item()  # host data
    assert counter.reads == ["item/bool", ".tolist()", "item/bool", ".cpu()"]


def test_report_refresh_and_first_steps(count_host_reads, capsys):
    """Not a limit: the reads of the first and refresh steps, printed for the record (-s shows them)."""
    for name in sorted(OPTIMIZERS):
        per_step = _run(name, count_host_reads)
        print(f"{name}: host reads per step {[len(r) for r in per_step]}")
        assert all(len(r) >= 1 for r in per_step)  # the gradient screen reads every step


def test_a_basis_fallback_is_reported_with_the_next_steps_read(count_host_reads, monkeypatch):
    """A QR that comes back non-finite keeps the previous bases, decided on the device: the refresh step
    still reads once, the next step's single read brings the count back and warns; a fallback on the
    last step is reported by state_dict()."""
    import warnings

    from soap_optim.eigenbasis import bases as bases_module

    real_geqrf = torch.geqrf

    def nan_geqrf(matrix, *args, **kwargs):
        reflectors, tau = real_geqrf(matrix, *args, **kwargs)
        return torch.full_like(reflectors, float("nan")), tau

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = SOAP(params, precondition_frequency=3)
    monkeypatch.setattr(bases_module, "_warned", set())
    monkeypatch.setattr(torch, "geqrf", nan_geqrf)
    reads, messages = [], []
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        counter = count_host_reads(opt)
        with warnings.catch_warnings(record=True) as caught, counter:
            warnings.simplefilter("always")
            opt.step()
        reads.append(len(counter.reads))
        messages.append([str(w.message) for w in caught])
    assert reads == [1] * 5
    assert messages[:4] == [[], [], [], []]  # the 4th call refreshes: nothing read yet
    assert messages[4] == ["soap_optim: QR refresh failed; keeping the previous basis"]
    assert all(torch.isfinite(b).all() for p in params for b in opt.state[p]["bases"] if b is not None)

    monkeypatch.setattr(bases_module, "_warned", set())
    for _ in range(2):  # the 7th call refreshes (and fails) last
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    with pytest.warns(RuntimeWarning, match="QR refresh failed"):
        opt.state_dict()


# ----------------------------------------------------------------------------- skip_nonfinite_grads="on_device"
ON_DEVICE = ["SOAP", "SOAP-one-parameter", "Shampoo", "Shampoo-roots", "AdamW", "Adam-single-tensor", "Adafactor"]


def _state_values(opt, params):
    """Parameters and every state tensor but the host step counters, as clones."""
    values = [p.detach().clone() for p in params]
    for p in params:
        for key, value in opt.state[p].items():
            if key != "step":
                values += [t.clone() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return values


@pytest.mark.parametrize("name", ON_DEVICE)
def test_on_device_check_reads_nothing(name, count_host_reads):
    """The opt-out of the host check: first, plain and refresh steps read no device data."""
    cls, options = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = cls(params, **options, skip_nonfinite_grads="on_device")
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        counter = count_host_reads(opt)
        with counter:
            opt.step()
        assert counter.reads == []


@pytest.mark.parametrize("name", ON_DEVICE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_on_device_skip_changes_nothing_but_the_step_counters(name, bad):
    """A NaN/Inf or too large gradient (1e30: above every limit but Adafactor's, whose float32 norm then
    overflows) on a plain step and on a refresh step (the 4th call): parameters and state come back bit
    for bit, nothing is non-finite, and the steps are counted once read."""
    cls, options = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = cls(params, **options, skip_nonfinite_grads="on_device")
    skipped = 0
    for call in range(7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        failing = call in (2, 3)
        if failing:
            params[call % len(params)].grad.view(-1)[0] = bad
            before = _state_values(opt, params)
        opt.step()
        if failing:
            skipped += 1
            after = _state_values(opt, params)
            assert all(torch.equal(a, b) for a, b in zip(after, before)), call
        assert all(torch.isfinite(t).all() for t in _state_values(opt, params))
    assert opt.param_groups[0]["skipped_steps"] == 0  # still on the device
    opt.read_device_counters()
    assert opt.param_groups[0]["skipped_steps"] == skipped
    opt.read_device_counters()  # read once: nothing counted twice
    assert opt.param_groups[0]["skipped_steps"] == skipped


def test_on_device_soap_with_finite_gradients_is_the_default_run_bit_for_bit():
    """Where every gradient passes, the selection keeps the step's values: SOAP's trajectory is the
    default one (its overflow guard returns ordinary gradients bit for bit)."""
    runs = []
    for skip in (False, "on_device"):
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        opt = SOAP(params, precondition_frequency=3, skip_nonfinite_grads=skip)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(_state_values(opt, params))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_on_device_is_refused_with_a_clear_error_for_a_bad_value():
    with pytest.raises(ValueError, match="skip_nonfinite_grads"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], skip_nonfinite_grads="sometimes")
