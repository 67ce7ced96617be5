"""torch ``OptimizerInfo`` entries for the soap_optim family (used by tests/test_torch_contract.py).

torch ships the description format in ``torch.testing._internal.common_optimizers``: an
``OptimizerInfo`` names the optimizer class, what it supports (``supported_impls``,
``supports_complex``, ``supports_sparse``, ...), an ``optim_inputs_func(device, dtype)`` giving
``OptimizerInput``s (constructor kwargs that do not depend on the parameters; ``params`` is None,
the test brings its own) and an ``optim_error_inputs_func(device, dtype)`` giving
``ErrorOptimizerInput``s (inputs that must raise, with the error type and a regex of its message).

:class:`SoapOptimizerInfo` adds what the soap_optim tests need beyond torch's fields:

* ``variant``: test id (several SOAP option sets share the class ``SOAP``); every input of the entry
  carries the variant's options (e.g. ``one_sided=True``);
* ``warmup_steps``: initial ``step()`` calls that do not move the parameters (SOAP: 1, its first step
  only builds the preconditioner);
* ``reference_cls``: a ``torch.optim`` class with the same math, where there is one;
* ``not_applicable``: ``{check name: reason}`` for the checks that cannot apply to this entry.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from registry import KERNELS_PROBLEM
from soap_optim import SOAP, Adafactor, Adam, AdamW, Shampoo

STEP_ERROR = OptimizerErrorEnum.STEP_ERROR

# Why checks cannot apply; referenced from the entries and listed in the test module's docstring.
NO_COMPLEX = (
    "complex parameters are rejected with ValueError at construction (checked by test_error_inputs): "
    "the eigenbasis/factored moments are defined for real matrices, so torch's view_as_real "
    "equivalence check has nothing to compare"
)
NO_SPARSE = (
    "sparse gradients are rejected with ValueError at step() before anything is modified (checked by "
    "test_error_inputs): Kronecker factors, eigenbases and factored moments need dense gradients"
)
NO_FOREACH = "{name} has no foreach option (one implementation only), so there is no for-loop twin to compare"
SOAP_FIRST_STEP = (
    "SOAP's first step() only builds the preconditioner (factors and bases from the first gradient) "
    "and leaves the parameters unchanged, so 'one step moves the parameters' does not apply"
)


class SoapOptimizerInfo(OptimizerInfo):
    def __init__(
        self,
        optim_cls,
        *,
        variant: str,
        warmup_steps: int = 0,
        reference_cls=None,
        not_applicable: Optional[Dict[str, str]] = None,
        **kwargs,
    ) -> None:
        super().__init__(optim_cls, **kwargs)
        self.variant = variant
        self.warmup_steps = warmup_steps
        self.reference_cls = reference_cls
        self.not_applicable = dict(not_applicable or {})
        if not self.supports_complex:
            self.not_applicable.setdefault("complex", NO_COMPLEX)
        if not self.supports_sparse:
            self.not_applicable.setdefault("sparse", NO_SPARSE)
        if "foreach" not in self.supported_impls:
            self.not_applicable.setdefault("foreach", NO_FOREACH.format(name=optim_cls.__name__))

    def class_default(self, key: str) -> Any:
        """The constructor's default for ``key`` (what torch's ``__setstate__`` convention fills in)."""
        return inspect.signature(self.optim_cls).parameters[key].default

    def __repr__(self) -> str:
        return self.variant


# ----------------------------------------------------------------------------- inputs
def _inputs(base: Dict[str, Any], extra: List[tuple], foreach: bool, device, dtype) -> List[OptimizerInput]:
    """The common set: base, tensor lr, weight decay, maximize (+ foreach True/False), each with ``base``."""
    lr = base["lr"]
    rows = [
        ({}, "default"),
        ({"lr": torch.tensor(lr)}, "0-d tensor lr"),
        ({"weight_decay": 0.1}, "weight_decay"),
        ({"maximize": True}, "maximize"),
    ] + extra
    if foreach:
        rows += [({"foreach": True}, "foreach"), ({"foreach": False}, "for-loop")]
    return [OptimizerInput(params=None, kwargs={**base, **kw}, desc=desc) for kw, desc in rows]


def _adam_inputs(device, dtype=None, base=None):
    base = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, **(base or {}))
    return _inputs(base, [({"amsgrad": True}, "amsgrad"), ({"eps": 1e-6}, "eps")], True, device, dtype)


def _soap_inputs(device, dtype=None, base=None, foreach=False):
    # precondition_frequency=2: every run of a few steps crosses basis refreshes
    base = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, precondition_frequency=2, **(base or {}))
    extra = [({"shampoo_beta": 0.9}, "shampoo_beta"), ({"correct_bias": False}, "no bias correction")]
    return _inputs(base, extra, foreach, device, dtype)


def _shampoo_inputs(device, dtype=None):
    base = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, precondition_frequency=2, start_preconditioning_step=2)
    extra = [({"grafting": "rmsprop", "shampoo_beta": 0.95}, "rmsprop graft"), ({"exponent_override": 0.5}, "power 1/2")]
    return _inputs(base, extra, False, device, dtype)


def _adafactor_inputs(device, dtype=None):
    base = dict(lr=1e-2, beta1=0.9, weight_decay=0.0)
    return _inputs(base, [({"beta1": None}, "no first moment"), ({"d": 2.0}, "clip d=2")], False, device, dtype)


# ----------------------------------------------------------------------------- error inputs
def _error(kwargs, regex, desc, error_type=ValueError, **more):
    return ErrorOptimizerInput(
        OptimizerInput(params=more.pop("params", None), kwargs=kwargs, desc=desc),
        error_type=error_type,
        error_regex=regex,
        **more,
    )


def _common_errors(base: Dict[str, Any], device, dtype) -> List[ErrorOptimizerInput]:
    dtype = dtype or torch.float32
    sparse_param = Parameter(torch.ones(3, 2, device=device, dtype=dtype))
    sparse_param.grad = torch.ones(3, 2, device=device, dtype=dtype).to_sparse()
    nan_param = Parameter(torch.ones(3, 2, device=device, dtype=dtype))
    nan_param.grad = torch.full((3, 2), math.nan, device=device, dtype=dtype)
    complex_param = Parameter(torch.ones(3, 2, device=device, dtype=torch.complex64))
    return [
        _error({**base, "lr": -1e-3}, r"lr=-0\.001", "negative lr"),
        _error({**base, "lr": math.nan}, r"lr=nan", "nan lr"),
        _error({**base, "lr": torch.tensor([1e-3, 1e-3])}, r"lr.*shape \(2,\)", "2-element tensor lr"),
        _error({**base, "weight_decay": -0.1}, r"weight_decay: -0\.1", "negative weight_decay"),
        _error({**base, "maximize": 1}, r"maximize: 1", "non-bool maximize"),
        _error(base, r"complex param", "complex parameter", params=[complex_param]),
        _error(base, r"sparse gradients", "sparse gradient", params=[sparse_param], error_on=STEP_ERROR),
        _error(base, r"non-finite gradient", "NaN gradient", params=[nan_param], error_on=STEP_ERROR,
               error_type=FloatingPointError),
    ]


def _betas_errors(base):
    return [
        _error({**base, "betas": (1.0, 0.9)}, r"index 0: 1\.0", "beta1 = 1"),
        _error({**base, "betas": (0.9, -0.5)}, r"index 1: -0\.5", "negative beta2"),
        _error({**base, "betas": 0.9}, r"betas.*0\.9", "betas not a pair"),
        _error({**base, "eps": -1e-8}, r"eps: -1e-08", "negative eps"),
    ]


def _adam_errors(device, dtype):
    base = dict(lr=1e-2)
    return _common_errors(base, device, dtype) + _betas_errors(base) + [
        _error({**base, "amsgrad": "yes"}, r"amsgrad: 'yes'", "non-bool amsgrad"),
        _error({**base, "foreach": "yes"}, r"foreach: 'yes'", "non-bool foreach"),
    ]


def _soap_errors(device, dtype):
    base = dict(lr=1e-2)
    return _common_errors(base, device, dtype) + _betas_errors(base) + [
        _error({**base, "shampoo_beta": 1.0}, r"shampoo_beta: 1\.0", "shampoo_beta = 1"),
        _error({**base, "precondition_frequency": 0}, r"precondition_frequency: 0", "zero frequency"),
        _error({**base, "precondition_frequency": 2.5}, r"precondition_frequency: 2\.5", "float frequency"),
        _error({**base, "max_precond_dim": -1}, r"max_precond_dim: -1", "negative max_precond_dim"),
        _error({**base, "data_format": "NHWC"}, r"data_format: 'NHWC'", "unknown data_format"),
        _error({**base, "merge_dims": "yes"}, r"merge_dims: 'yes'", "non-bool merge_dims"),
    ]


def _shampoo_errors(device, dtype):
    base = dict(lr=1e-2)
    return _common_errors(base, device, dtype) + _betas_errors(base) + [
        _error({**base, "shampoo_beta": 1.5}, r"shampoo_beta: 1\.5", "shampoo_beta > 1"),
        _error({**base, "matrix_eps": -1e-6}, r"matrix_eps: -1e-06", "negative matrix_eps"),
        _error({**base, "start_preconditioning_step": 0}, r"start_preconditioning_step: 0", "zero start"),
        _error({**base, "exponent_override": -0.5}, r"exponent_override: -0\.5", "negative exponent"),
        _error({**base, "grafting": "adagrad"}, r"grafting: 'adagrad'", "unknown grafting"),
    ]


def _adafactor_errors(device, dtype):
    base = dict(lr=1e-2)
    return _common_errors(base, device, dtype) + [
        _error({**base, "beta1": 1.0}, r"beta1: 1\.0", "beta1 = 1"),
        _error({**base, "beta2_decay": 0.5}, r"beta2_decay: 0\.5", "positive beta2_decay"),
        _error({**base, "eps": 0.0}, r"eps: 0\.0", "zero eps"),
        _error({**base, "d": 0.0}, r"d: 0\.0", "zero d"),
    ]


# ----------------------------------------------------------------------------- the entries
SCHEDULERS = (
    lambda opt: LambdaLR(opt, lambda epoch: 0.5 ** epoch),
    lambda opt: CosineAnnealingLR(opt, T_max=4),
)
# flags added after the optimizers' first release (torch's not_og_supported_flags): a state dict
# written before they existed lacks them, and loading must fill in the defaults
_NEW_FLAGS = ("maximize", "orthograd", "state_dtype", "foreach", "fused")
_SOAP_NEW_FLAGS = _NEW_FLAGS + (
    "one_sided", "one_sided_dim", "factorized", "rotation_precision", "refresh_tolerance",
)

_COMMON = dict(supports_complex=False, supports_sparse=False, scheduler_inputs=(SCHEDULERS,))


def _soap_info(variant: str, options: Dict[str, Any], foreach: bool = False) -> SoapOptimizerInfo:
    not_applicable = {"first_step_moves": SOAP_FIRST_STEP}
    if not foreach:
        not_applicable["foreach"] = (
            f"this entry pins {options} (foreach is compared on the soap entry, where the option is free)"
        )
    elif KERNELS_PROBLEM is not None:
        not_applicable["foreach"] = KERNELS_PROBLEM
    return SoapOptimizerInfo(
        SOAP,
        variant=variant,
        warmup_steps=1,
        optim_inputs_func=lambda device, dtype=None: _soap_inputs(device, dtype, options),
        optim_error_inputs_func=_soap_errors,
        supported_impls=("foreach",),
        not_og_supported_flags=_SOAP_NEW_FLAGS,
        not_applicable=not_applicable,
        **_COMMON,
    )


OPTIM_INFOS: List[SoapOptimizerInfo] = [
    SoapOptimizerInfo(
        Adam,
        variant="adam",
        reference_cls=torch.optim.Adam,
        optim_inputs_func=_adam_inputs,
        optim_error_inputs_func=_adam_errors,
        supported_impls=("foreach",),
        not_og_supported_flags=_NEW_FLAGS,
        **_COMMON,
    ),
    SoapOptimizerInfo(
        AdamW,
        variant="adamw",
        reference_cls=torch.optim.AdamW,
        optim_inputs_func=_adam_inputs,
        optim_error_inputs_func=_adam_errors,
        supported_impls=("foreach",),
        not_og_supported_flags=_NEW_FLAGS,
        **_COMMON,
    ),
    _soap_info("soap", {}, foreach=True),
    _soap_info("soap-one_sided", {"one_sided": True}),
    _soap_info("soap-factorized", {"factorized": True}),
    _soap_info("soap-for-loop", {"foreach": False}),
    _soap_info("soap-precondition_1d", {"precondition_1d": True}),
    _soap_info("soap-merge_dims", {"merge_dims": True}),
    _soap_info("soap-refresh_tolerance", {"refresh_tolerance": 0.05}),
    SoapOptimizerInfo(
        Shampoo,
        variant="shampoo",
        optim_inputs_func=_shampoo_inputs,
        optim_error_inputs_func=_shampoo_errors,
        supported_impls=(),
        not_og_supported_flags=_NEW_FLAGS[:-2] + ("fused",),
        **_COMMON,
    ),
    SoapOptimizerInfo(
        Adafactor,
        variant="adafactor",
        optim_inputs_func=_adafactor_inputs,
        optim_error_inputs_func=_adafactor_errors,
        supported_impls=(),
        not_og_supported_flags=("maximize", "orthograd", "state_dtype"),
        **_COMMON,
    ),
]
