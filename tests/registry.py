"""Registry of optimizers for the generic contract tests (tests/test_contract.py).

Each optimizer of the family gets one :class:`OptimizerEntry`. To add an optimizer, append an entry
to ``OPTIMIZERS``::

    OPTIMIZERS.append(OptimizerEntry(
        name="adamw",
        factory=lambda params, **kw: AdamW(params, **kw),
        hparams=dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01),
        bad_cases=[("lr", -1.0, "lr"), ("eps", -1e-8, "eps")],
        warmup_steps=0,                           # AdamW moves the parameters from its first step
        float32_state_keys=("exp_avg", "exp_avg_sq"),
    ))

Field meanings are documented on the dataclass. The generic tests only rely on the
``torch.optim.Optimizer`` interface plus ``lr``, ``weight_decay`` and ``maximize`` group keys.

The module also holds small helpers shared by the test files (state snapshots and bitwise
comparison of nested state) and ``SOAP_PATHS``, the SOAP code paths runnable here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo


def _kernels_problem() -> Optional[str]:
    """Why SOAP's batched path (soap_optim.kernels) cannot run here, or None if it can."""
    try:
        import soap_optim.kernels  # noqa: F401  (absent when run from a source tree without install)
    except ImportError as error:
        return f"soap_optim.kernels not importable ({error}); install with `pip install -e .`"
    return None


_SOAP_HAS_FOREACH = "foreach" in inspect.signature(SOAP).parameters
KERNELS_PROBLEM = _kernels_problem() if _SOAP_HAS_FOREACH else None

# Extra SOAP kwargs selecting each code path that can run here: the one-parameter-at-a-time path
# always; the batched pure-PyTorch path (same-shaped 2-D parameters stepped together) when
# soap_optim.kernels imports.
SOAP_PATHS: Dict[str, Dict[str, Any]] = {"single": {"foreach": False} if _SOAP_HAS_FOREACH else {}}
if _SOAP_HAS_FOREACH and KERNELS_PROBLEM is None:
    SOAP_PATHS["batched"] = {"foreach": True, "fused": False}


@dataclass
class OptimizerEntry:
    """One optimizer under test.

    name:      test id.
    factory:   ``factory(params, **kwargs) -> optimizer``; ``params`` is anything torch.optim accepts
               (an iterable of tensors or a list of param-group dicts).
    hparams:   small, valid hyperparameters used by the generic tests (passed to ``factory``). They must
               include ``lr``; tests assume ``lr=0`` freezes the parameters (decay scaled by lr, or 0).
    bad_cases: ``(kwarg, bad_value, substring)``: ``factory(params, **{**hparams, kwarg: bad_value})``
               and ``add_param_group`` with that value must raise ValueError whose message contains
               ``substring``.
    warmup_steps: number of initial ``step()`` calls that leave the parameters unchanged
               (SOAP's first step only builds the preconditioner: 1; Adam-like optimizers: 0).
               Tests needing movement take at least ``warmup_steps + 1`` (usually more) steps.
    float32_state_keys: state keys whose (lists of) floating tensors must stay float32 for
               bf16/fp16/fp32 parameters and float64 for float64 parameters, also across
               ``load_state_dict``. ``None`` entries inside lists are allowed.
    skip_reason: if not None, the generic tests for this entry are skipped with this reason
               (e.g. an optional dependency is missing).
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    hparams: Dict[str, Any]
    bad_cases: List[Tuple[str, Any, str]] = field(default_factory=list)
    warmup_steps: int = 0
    float32_state_keys: Sequence[str] = ()
    skip_reason: Optional[str] = None

    def make(self, params, **overrides) -> torch.optim.Optimizer:
        return self.factory(params, **{**self.hparams, **overrides})


_SOAP_HPARAMS = dict(
    lr=1e-2,
    betas=(0.9, 0.95),
    weight_decay=0.01,
    # precondition_frequency=2 so that a 5 + 5 step round trip crosses basis refreshes;
    precondition_frequency=2,
    # precondition_1d so that biases get bases as well.
    precondition_1d=True,
)
_SOAP_BAD_CASES = [
    ("lr", -1e-3, "lr"),
    ("lr", float("nan"), "lr"),
    ("betas", (1.0, 0.9), "index 0"),
    ("betas", (0.9, -0.5), "index 1"),
    ("betas", 0.9, "betas"),
    ("eps", -1e-8, "eps"),
    ("weight_decay", -0.1, "weight_decay"),
    ("shampoo_beta", 1.0, "shampoo_beta"),
    ("precondition_frequency", 0, "precondition_frequency"),
    ("precondition_frequency", 2.5, "precondition_frequency"),
    ("max_precond_dim", -1, "max_precond_dim"),
    ("data_format", "NHWC", "data_format"),
    ("merge_dims", "yes", "merge_dims"),
    ("maximize", 1, "maximize"),
]

OPTIMIZERS: List[OptimizerEntry] = [
    OptimizerEntry(
        name="soap",
        factory=lambda params, **kw: SOAP(params, **kw),
        hparams={**_SOAP_HPARAMS, **SOAP_PATHS["single"]},
        bad_cases=_SOAP_BAD_CASES,
        warmup_steps=1,
        float32_state_keys=("exp_avg", "exp_avg_sq", "factors", "bases"),
    ),
]
if _SOAP_HAS_FOREACH:
    OPTIMIZERS.append(
        OptimizerEntry(
            name="soap-batched",
            factory=lambda params, **kw: SOAP(params, **kw),
            hparams={**_SOAP_HPARAMS, "foreach": True, "fused": False},
            bad_cases=_SOAP_BAD_CASES,
            warmup_steps=1,
            float32_state_keys=("exp_avg", "exp_avg_sq", "factors", "bases"),
            skip_reason=KERNELS_PROBLEM,
        )
    )

OPTIMIZERS.append(
    OptimizerEntry(
        name="soap-one-sided-factorized",
        factory=lambda params, **kw: SOAP(params, **kw),
        hparams={**_SOAP_HPARAMS, "one_sided": True, "factorized": True},
        bad_cases=_SOAP_BAD_CASES + [("one_sided", "yes", "one_sided"), ("one_sided_dim", 1.5, "one_sided_dim")],
        warmup_steps=1,
        float32_state_keys=("exp_avg", "factors", "bases"),
    )
)

# KL factor updates (soap_optim.eigenbasis.kl) on both SOAP paths: the contract (resume, hooks, bad input,
# closures, ...) with the extra ``eigenvalues`` state
for _name, _path in [("soap-kl", SOAP_PATHS["single"]), ("soap-kl-batched", {"foreach": True, "fused": False})]:
    OPTIMIZERS.append(
        OptimizerEntry(
            name=_name,
            factory=lambda params, **kw: SOAP(params, **kw),
            hparams={**_SOAP_HPARAMS, **_path, "factor_update": "kl"},
            bad_cases=_SOAP_BAD_CASES + [("factor_update", "whitened", "factor_update")],
            warmup_steps=1,
            float32_state_keys=("exp_avg", "exp_avg_sq", "factors", "bases", "eigenvalues"),
            skip_reason=KERNELS_PROBLEM if _path.get("foreach") else None,
        )
    )

# The SOAP-basis + Newton-Schulz update (soap_optim.newton_schulz) on both SOAP paths: the same contract
for _name, _path in [("soap-newton-schulz", SOAP_PATHS["single"]),
                     ("soap-newton-schulz-batched", {"foreach": True, "fused": False})]:
    OPTIMIZERS.append(
        OptimizerEntry(
            name=_name,
            factory=lambda params, **kw: SOAP(params, **kw),
            # the update's RMS is 0.2 lr (Muon's match_rms_adamw), Adam's early ones near lr: a larger lr
            hparams={**_SOAP_HPARAMS, **_path, "newton_schulz": True, "lr": 5e-2},
            bad_cases=_SOAP_BAD_CASES + [("newton_schulz", "yes", "newton_schulz")],
            warmup_steps=1,
            float32_state_keys=("exp_avg", "exp_avg_sq", "factors", "bases"),
            skip_reason=KERNELS_PROBLEM if _path.get("foreach") else None,
        )
    )

_ADAM_BAD_CASES = [
    ("lr", -1e-3, "lr"),
    ("lr", float("nan"), "lr"),
    ("betas", (1.0, 0.9), "index 0"),
    ("betas", (0.9, -0.5), "index 1"),
    ("betas", 0.9, "betas"),
    ("eps", -1e-8, "eps"),
    ("weight_decay", -0.1, "weight_decay"),
    ("amsgrad", "yes", "amsgrad"),
    ("foreach", "yes", "foreach"),
    ("maximize", 1, "maximize"),
]
_ADAM_HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
for _name, _cls, _extra in [
    ("adam", Adam, {}),
    ("adam-single", Adam, {"foreach": False}),
    ("adamw", AdamW, {}),
    ("adamw-single-amsgrad", AdamW, {"foreach": False, "amsgrad": True}),
]:
    OPTIMIZERS.append(
        OptimizerEntry(
            name=_name,
            factory=lambda params, _cls=_cls, **kw: _cls(params, **kw),
            hparams={**_ADAM_HPARAMS, **_extra},
            bad_cases=_ADAM_BAD_CASES,
            warmup_steps=0,
            float32_state_keys=("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if _extra.get("amsgrad") else ()),
        )
    )

_SHAMPOO_BAD_CASES = [
    ("lr", -1e-3, "lr"),
    ("betas", (0.9, 1.0), "index 1"),
    ("shampoo_beta", 1.5, "shampoo_beta"),
    ("eps", -1e-8, "eps"),
    ("matrix_eps", -1e-6, "matrix_eps"),
    ("weight_decay", -0.1, "weight_decay"),
    ("precondition_frequency", 0, "precondition_frequency"),
    ("start_preconditioning_step", 0, "start_preconditioning_step"),
    ("exponent_override", -0.5, "exponent_override"),
    ("grafting", "adagrad", "grafting"),
    ("max_precond_dim", -1, "max_precond_dim"),
    ("data_format", "NHWC", "data_format"),
    ("maximize", 1, "maximize"),
]
# Preconditioning from step 2, roots every 2 steps, biases preconditioned too: round trips cross refreshes.
_SHAMPOO_HPARAMS = dict(
    lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=2, start_preconditioning_step=2,
    precondition_1d=True,
)
for _name, _extra in [
    ("shampoo", {}),
    ("shampoo-power-half-ema-rmsprop", {"exponent_override": 0.5, "shampoo_beta": 0.95, "grafting": "rmsprop"}),
    ("shampoo-kl", {"factor_update": "kl"}),
]:
    OPTIMIZERS.append(
        OptimizerEntry(
            name=_name,
            factory=lambda params, **kw: Shampoo(params, **kw),
            hparams={**_SHAMPOO_HPARAMS, **_extra},
            bad_cases=_SHAMPOO_BAD_CASES + [("factor_update", "whitened", "factor_update")],
            warmup_steps=0,
            float32_state_keys=("exp_avg", "factors", "roots")
            + (("exp_avg_sq",) if _extra.get("grafting", "adam") in ("adam", "rmsprop") else ()),
        )
    )

OPTIMIZERS.append(
    OptimizerEntry(
        name="adafactor",
        factory=lambda params, **kw: Adafactor(params, **kw),
        hparams=dict(lr=1e-2, beta1=0.9, weight_decay=0.01),
        bad_cases=[
            ("lr", -1e-3, "lr"),
            ("beta1", 1.0, "beta1"),
            ("beta2_decay", 0.5, "beta2_decay"),
            ("eps", 0.0, "eps"),
            ("d", 0.0, "d"),
            ("weight_decay", -0.1, "weight_decay"),
            ("maximize", 1, "maximize"),
        ],
        warmup_steps=0,
        # matrices keep exp_avg_sq_row/col and vectors exp_avg_sq; round trips still compare all state
        float32_state_keys=("exp_avg",),
    )
)


def entry_ids(entries: Sequence[OptimizerEntry] = None) -> List[str]:
    return [e.name for e in (OPTIMIZERS if entries is None else entries)]


def entry_params(entries: Sequence[OptimizerEntry] = None) -> list:
    """``pytest.param`` per entry (id = name), skipped where ``skip_reason`` is set."""
    import pytest

    return [
        pytest.param(e, id=e.name, marks=[pytest.mark.skip(reason=e.skip_reason)] if e.skip_reason else [])
        for e in (OPTIMIZERS if entries is None else entries)
    ]


# ----------------------------------------------------------------------------- helpers
def snapshot(value: Any) -> Any:
    """Deep copy of (nested dicts/lists/tuples of) tensors and plain values."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def optimizer_snapshot(opt: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Per parameter (in param-group order): a deep copy of its state."""
    return [snapshot(dict(opt.state.get(p, {}))) for g in opt.param_groups for p in g["params"]]


def assert_bitwise_equal(a: Any, b: Any, where: str = "value") -> None:
    """Nested structures equal; tensors equal bit for bit (dtype, shape, NaNs at the same places)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if a.dtype.is_floating_point:
            # compare bit patterns (also distinguishes -0.0 from 0.0 and is NaN-safe)
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            same = torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
        else:
            same = torch.equal(a, b)
        assert same, f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max().item():.3e})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def iter_state_tensors(value: Any):
    """Yield every tensor inside (nested) state."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_state_tensors(v)
