"""The precision contract (soap_optim.precision): the user's global float32 matmul settings never reach the
preconditioner, and the guard gives the settings back unchanged.

Which machines can tell a missing guard: ``set_float32_matmul_precision("high")`` only changes float32
matmuls on GPUs with TF32 (Ampere and later) and on CPUs whose oneDNN offers TF32 (AMX-capable Xeons);
``"medium"`` changes them on such GPUs (bf16) and on CPUs with AVX-512-BF16 or AMX, where oneDNN takes
the matmul (on the AVX-512-BF16 EPYC this suite is developed on, "medium" gives other float32 bits: a
512 x 512 product moves from 4.2e-7 to 8.2e-7 relative error). On a CPU without either, no setting
changes any bit and the trajectory test passes with or without the guard;
``test_a_missing_guard_is_detected_here`` says which case this machine is.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import soap_optim.precision as precision
from golden import golden_cases, load_case
from registry import assert_bitwise_equal, optimizer_snapshot
from soap_optim import SOAP, Shampoo

USER_SETTINGS = ("highest", "high", "medium")


@contextlib.contextmanager
def user_precision(setting: str):
    """What a training script does: the legacy global switch, restored afterwards for the next test."""
    saved = [backend.fp32_precision for backend in precision._MATMUL_BACKENDS]
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")
        for backend, value in zip(precision._MATMUL_BACKENDS, saved):
            backend.fp32_precision = value


def settings_change_float32_matmul() -> dict:
    """For each user setting: whether it changes the bits of a float32 product on this machine."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=gen), torch.randn(256, 256, generator=gen)
    with user_precision("highest"):
        exact = a @ b
    changed = {}
    for setting in USER_SETTINGS:
        with user_precision(setting):
            changed[setting] = not torch.equal(a @ b, exact)
    return changed


def _backend_values():
    return tuple(backend.fp32_precision for backend in precision._MATMUL_BACKENDS)


@pytest.mark.parametrize("setting", USER_SETTINGS)
def test_guard_forces_ieee_and_restores_the_users_settings(setting):
    with user_precision(setting):
        before = _backend_values()
        with precision.full_float32_matmul():
            assert all(v == "ieee" for v in _backend_values()) or not precision._MATMUL_BACKENDS
            with precision.full_float32_matmul():  # nested: still forced, still restored once
                assert all(v == "ieee" for v in _backend_values()) or not precision._MATMUL_BACKENDS
        assert _backend_values() == before
        with pytest.raises(KeyError):
            with precision.full_float32_matmul():
                raise KeyError("inside")
        assert _backend_values() == before
        # the legacy reader still works (torch refuses it once the two APIs are mixed inconsistently)
        assert torch.get_float32_matmul_precision() == setting


def test_guard_overrides_per_backend_settings():
    """A user who set the newer per-backend switches (mkldnn bf16, cuda tf32) is overridden too."""
    if not precision._MATMUL_BACKENDS:
        pytest.skip("this torch has no per-backend fp32_precision switches")
    saved = _backend_values()
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with precision.full_float32_matmul():
            assert _backend_values() == ("ieee",) * len(saved)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        for backend, value in zip(precision._MATMUL_BACKENDS, saved):
            backend.fp32_precision = value


# oneDNN takes float32 products from about 200 x 200 up (smaller ones never change bits on a CPU), so a
# problem with 256-wide factors joins the golden ones: a quadratic whose curvature spans 4 decades.
LARGE = "large_256x224"
CASES = [c for c in golden_cases() if c in ("c03_square_freq1", "c06_tensor3d_freq3", "c08_merge_dims")] + [LARGE]
VARIANTS = {
    "batched": (SOAP, dict()),
    "one-parameter": (SOAP, dict(foreach=False)),
    "one-sided": (SOAP, dict(one_sided=True)),
    "shampoo": (Shampoo, dict(precondition_frequency=3)),
}


def _problem(case):
    """(options, parameters, gradient function of step t) of a golden case or of the large problem."""
    if case == LARGE:
        gen = torch.Generator().manual_seed(3)
        target = torch.randn(256, 224, generator=gen)
        curvature = torch.logspace(0, -4, 224)[None, :] * torch.logspace(0, -1, 256)[:, None]
        noise = [0.1 * torch.randn(256, 224, generator=gen) for _ in range(8)]
        params = [torch.nn.Parameter(torch.zeros(256, 224))]
        return dict(precondition_frequency=3), params, lambda t: [curvature * (params[0].detach() - target) + noise[t]]
    data, meta = load_case(case)
    params = [torch.nn.Parameter(torch.tensor(data[f"data__p{k}__init"], dtype=torch.float32).reshape(shape))
              for k, (_, shape) in enumerate(meta["params"])]
    problems = [(torch.tensor(data[f"data__p{k}__A"], dtype=torch.float32),
                 torch.tensor(data[f"data__p{k}__y"], dtype=torch.float32)) for k in range(len(params))]

    def grads(t):
        rows = [(16 * (t - 1) + i) % 64 for i in range(32)]
        return [(a[rows].T @ (a[rows] @ p.detach().reshape(-1) - y[rows]) / 32).reshape(p.shape)
                for p, (a, y) in zip(params, problems)]

    return meta["hp"], params, grads


def _run(case, setting, variant):
    """A problem's first steps with the optimizer stepping under ``setting``. The gradients (the user's
    own products) are computed at full precision, so that only the optimizer could differ."""
    cls, options = VARIANTS[variant]
    hp, params, grads = _problem(case)
    if cls is SOAP:
        options = {**hp, **options}
    opt = cls(params, **options)
    trajectory = []
    for t in range(1, 8 if case == LARGE else 21):
        with user_precision("highest"):
            for p, g in zip(params, grads(t)):
                p.grad = g
        with user_precision(setting):
            opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, optimizer_snapshot(opt)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_trajectories_are_bitwise_equal_under_every_user_setting(case, variant):
    baseline = _run(case, "highest", variant)
    for setting in ("high", "medium"):
        assert_bitwise_equal(_run(case, setting, variant), baseline, where=f"{case} {variant} under {setting!r}")


def test_a_missing_guard_is_detected_here(monkeypatch):
    """The trajectory test has teeth on this machine if some setting changes float32 products here:
    then, with the guard switched off, a trajectory must differ. Skipped (saying so) on machines where
    no setting changes a float32 product, where the trajectory test cannot tell."""
    changed = settings_change_float32_matmul()
    if not (changed["high"] or changed["medium"]):
        pytest.skip(f"no matmul precision setting changes float32 products on this CPU ({changed}): "
                    "a missing guard is invisible here (it shows on TF32 GPUs and AVX-512-BF16/AMX CPUs)")
    monkeypatch.setattr(precision, "_save_and_force", lambda: None)
    monkeypatch.setattr(precision, "_restore", lambda saved: None)
    setting = "medium" if changed["medium"] else "high"
    baseline = _run(LARGE, "highest", "batched")
    unguarded = _run(LARGE, setting, "batched")
    with pytest.raises(AssertionError, match="differ"):
        assert_bitwise_equal(unguarded, baseline)


@pytest.mark.skipif(not golden_cases(), reason="golden trajectories not found (set SOAP_GOLDEN_DIR)")
def test_rotation_precisions_on_the_golden_cases():
    """tf32x3 (three TF32 products) keeps every golden float32 trajectory within the reference's 2e-5,
    like fp32; one-pass tf32 and bf16 move them measurably (the twins do round, emulating the kernels).
    Measured (benchmarks/precision_golden.py, max over the 11 cases): fp32 2.7e-6, tf32x3 2.7e-6,
    tf32 1.5e-4, bf16 2.4e-3."""
    import numpy as np

    from golden import replay

    worst = {}
    for case in golden_cases():
        data, meta = load_case(case)
        for rotation_precision in ("tf32x3", "tf32", "bf16"):
            trajs = replay(case, "ref_f32", torch.float32, inject_q1=meta["metrics"]["ill_posed_first_eigh"],
                           rotation_precision=rotation_precision)[0]
            error = max(float(np.abs(t.double().numpy() - data[f"ref_f32__p{k}__traj"]).max())
                        for k, t in enumerate(trajs))
            worst[rotation_precision] = max(worst.get(rotation_precision, 0.0), error)
    assert worst["tf32x3"] <= 2e-5, worst
    assert 2e-5 < worst["tf32"] < 1e-3 and 1e-4 < worst["bf16"] < 1e-2, worst
