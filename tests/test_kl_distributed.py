"""KL factor updates under FSDP2 and sharded DDP (``process_group=``) on 2 gloo ranks, bit for bit equal to
one process (the harness and helpers of tests/test_distributed.py), DCP resume included.

KL-SOAP adds one state entry per factor, ``eigenvalues`` ([d] vectors next to the d x d factors): this proves
the distribution layer carries it (owner-stepped state, the all-to-all of new values, the DCP form) as it does
the factors and bases.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_harness import OPTIMIZERS, reference_run, run_job  # noqa: E402
from test_distributed import MODES, STEPS, _compare, _dcp_resume, _distributed, _records, _state_numel, _train  # noqa: E402

import soap_optim  # noqa: E402

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

KL = {
    "soap-kl": lambda params, **kw: soap_optim.SOAP(
        params, lr=1e-2, precondition_frequency=3, factor_update="kl", **kw
    ),
    "soap-kl-merge-1d": lambda params, **kw: soap_optim.SOAP(
        params, lr=1e-2, precondition_frequency=3, merge_dims=True, precondition_1d=True, max_precond_dim=16,
        factor_update="kl", **kw
    ),
    "shampoo-kl": lambda params, **kw: soap_optim.Shampoo(
        params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2, factor_update="kl", **kw
    ),
}


def _build(name, mode, dtype):
    """test_distributed's (model, optimizer) as a user builds them, for a KL optimizer: registered by name only
    while it is built, so that no other module's list of optimizers ever sees it."""
    OPTIMIZERS[name] = KL[name]
    try:
        return _distributed(name, mode, dtype)
    finally:
        del OPTIMIZERS[name]


def _parity(name, mode, rank, out_dir):
    dtype = torch.float32
    model, opt = _build(name, mode, dtype)
    _train(model, opt, range(STEPS), dtype, rank)
    reference, reference_opt = reference_run(KL[name], dtype, range(STEPS))
    has_eigenvalues = any("eigenvalues" in state for state in opt.state.values())
    return {**_compare(model, reference), "state_numel": _state_numel(opt),
            "reference_state_numel": _state_numel(reference_opt), "has_eigenvalues": has_eigenvalues}


PARITY = [(name, mode) for name in KL for mode in MODES]
SCENARIOS = {f"parity-{name}-{mode}": functools.partial(_parity, name, mode) for name, mode in PARITY}
for _mode in MODES:
    SCENARIOS[f"dcp-{_mode}"] = functools.partial(_dcp_resume, _mode, name="soap-kl", build=_build, spec=KL["soap-kl"])


@pytest.fixture(scope="module")
def job():
    return run_job("test_kl_distributed", list(SCENARIOS))


@pytest.mark.parametrize("name,mode", PARITY, ids=[f"{n}-{m}" for n, m in PARITY])
def test_bitwise_parity_with_one_process(job, name, mode):
    checks = _records(job, f"parity-{name}-{mode}")
    for rank, check in enumerate(checks):
        assert check["bitwise"], f"rank {rank}: max difference {check['max_diff']}"
    per_rank = [check["state_numel"] for check in checks]
    assert sum(per_rank) == checks[0]["reference_state_numel"], per_rank
    if name.startswith("soap"):
        assert any(check["has_eigenvalues"] for check in checks)


@pytest.mark.parametrize("mode", MODES)
def test_dcp_resume_is_bitwise(job, mode):
    for rank, check in enumerate(_records(job, f"dcp-{mode}")):
        assert check["resumed_equal"], rank
        assert check["bitwise"], (rank, check["max_diff"])
