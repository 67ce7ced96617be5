"""The optimizers a benchmark run compares, each built from one shared set of hyperparameters.

Every optimizer is an :class:`OptimizerSpec`: a class and a function that maps the shared
:class:`Hyper` to the exact keyword arguments passed to it (those are recorded in the results). The
shared hyperparameters are the ones every method has (``lr``, ``betas``, ``eps``, ``weight_decay``)
and, for the preconditioned ones, ``precondition_frequency`` and ``max_precond_dim``; everything else
stays at each class's default.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

BASELINE = "torch-adamw"


def soap_class_defaults() -> Dict[str, Any]:
    """``soap_optim.SOAP``'s own defaults of the settings every optimizer shares here."""
    import inspect

    import soap_optim

    parameters = inspect.signature(soap_optim.SOAP.__init__).parameters
    return {name: parameters[name].default for name in ("betas", "precondition_frequency")}


SOAP_DEFAULTS = soap_class_defaults()


@dataclass(frozen=True)
class Hyper:
    lr: float = 1e-2
    betas: Tuple[float, float] = SOAP_DEFAULTS["betas"]
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = SOAP_DEFAULTS["precondition_frequency"]
    max_precond_dim: int = 10000

    def with_(self, **changes: Any) -> "Hyper":
        return replace(self, **changes)

    def adam(self) -> Dict[str, Any]:
        return dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


@dataclass
class OptimizerSpec:
    """One optimizer: ``make(params, hyper)`` builds it with ``kwargs(hyper)``.

    ``period`` is the number of steps between preconditioner refreshes (None: no refresh), used to time
    refresh and non-refresh steps apart. ``prepare`` runs once before the first build (a peer's global
    switch, say); ``notes`` are printed and recorded beside the results.
    """

    key: str
    label: str
    source: str
    cls: Optional[type]
    kwargs: Callable[[Hyper], Dict[str, Any]]
    period: Callable[[Hyper], Optional[int]] = lambda hyper: None
    prepare: Optional[Callable[[], None]] = None
    notes: List[str] = field(default_factory=list)
    unavailable: Optional[str] = None  # why it can't run here; None when it can
    params_of: Optional[Callable[[Any], Any]] = None  # model -> params or groups; None: model.parameters()

    def make(self, params, hyper: Hyper) -> torch.optim.Optimizer:
        if self.cls is None:
            raise RuntimeError(self.unavailable or f"{self.label} is unavailable")
        return self.cls(params, **self.kwargs(hyper))

    def build(self, model, hyper: Hyper) -> torch.optim.Optimizer:
        """The optimizer for ``model``'s parameters (split into groups first where the spec says so)."""
        return self.make(model.parameters() if self.params_of is None else self.params_of(model), hyper)

    def record(self, hyper: Hyper) -> Dict[str, Any]:
        """What the results say about this optimizer: where it comes from and the exact kwargs."""
        cls_name = None if self.cls is None else f"{self.cls.__module__}.{self.cls.__qualname__}"
        return {
            "label": self.label,
            "source": self.source,
            "class": cls_name,
            "kwargs": None if self.cls is None else _jsonable(self.kwargs(hyper)),
            "refresh_period": self.period(hyper),
            "notes": list(self.notes),
            "unavailable": self.unavailable,
        }


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return f"{type(value).__name__}.{value.name}"
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, (int, float, str, bool, type(None))):
            return value
        return repr(value)

    return {key: plain(value) for key, value in kwargs.items()}


def _family_class(name: str, module: str) -> Tuple[Optional[type], Optional[str]]:
    """``soap_optim.<name>``, or the class from ``soap_optim.<module>`` if not exported yet; else why not."""
    import soap_optim

    cls = getattr(soap_optim, name, None)
    if cls is not None:
        return cls, None
    try:
        cls = getattr(importlib.import_module(f"soap_optim.{module}"), name, None)
    except Exception as error:  # a module mid-change can fail in any way; the run goes on without it
        return None, f"soap_optim.{module} does not import here ({type(error).__name__}: {error})"
    if cls is None:
        return None, f"soap_optim has no {name} yet"
    return cls, None


#: The soap-ns arm's refresh period: on the LM every 10 steps reached AdamW's loss in as many steps as every 2
#: (benchmarks/README.md, "SOAP + Newton-Schulz").
NEWTON_SCHULZ_FREQUENCY = 10


def _precond(hyper: Hyper) -> Dict[str, Any]:
    return dict(precondition_frequency=hyper.precondition_frequency, max_precond_dim=hyper.max_precond_dim)


def ours() -> List[OptimizerSpec]:
    """torch's AdamW (the baseline) and soap_optim's optimizers, the optional ones when present."""
    import soap_optim
    from soap_optim.groups import hidden_groups

    refresh = lambda hyper: hyper.precondition_frequency  # noqa: E731
    specs = [
        OptimizerSpec(
            BASELINE, "torch AdamW", f"torch {torch.__version__}", torch.optim.AdamW,
            lambda h: dict(h.adam(), foreach=True),
        ),
        OptimizerSpec(
            "soap", "SOAP", "soap_optim", soap_optim.SOAP, lambda h: dict(h.adam(), **_precond(h)), refresh,
        ),
        OptimizerSpec(
            "soap-hidden", "SOAP, embeddings and output layer on Adam", "soap_optim", soap_optim.SOAP,
            lambda h: dict(h.adam(), **_precond(h)), refresh, params_of=hidden_groups,
            notes=["soap_optim.hidden_groups(model): the embeddings and the last Linear get max_precond_dim=0 "
                   "(Adam in the standard basis, SOAP's betas), the split torch Muon's recipe makes"],
        ),
        OptimizerSpec(
            "soap-ns", "SOAP + Newton-Schulz, embeddings and output layer on Adam", "soap_optim", soap_optim.SOAP,
            lambda h: dict(h.adam(), **_precond(h), newton_schulz=True) | {"precondition_frequency": NEWTON_SCHULZ_FREQUENCY},
            lambda hyper: NEWTON_SCHULZ_FREQUENCY, params_of=hidden_groups,
            notes=["SOAP(newton_schulz=True) on soap_optim.hidden_groups(model): the hidden matrices take SOAP's "
                   "Nesterov Adam ratio in the eigenbasis orthogonalized by Muon's Newton-Schulz iteration; basis "
                   f"refreshed every {NEWTON_SCHULZ_FREQUENCY} steps (the orthogonalization makes a stale basis cheap)"],
        ),
        OptimizerSpec(
            "soap-one-sided", "SOAP one-sided", "soap_optim", soap_optim.SOAP,
            lambda h: dict(h.adam(), **_precond(h), one_sided=True), refresh,
        ),
        OptimizerSpec(
            "soap-factorized", "SOAP factorized", "soap_optim", soap_optim.SOAP,
            lambda h: dict(h.adam(), **_precond(h), factorized=True), refresh,
        ),
        OptimizerSpec(
            "soap-bf16-rotations", "SOAP bf16 rotations", "soap_optim", soap_optim.SOAP,
            lambda h: dict(h.adam(), **_precond(h), rotation_precision="bf16"), refresh,
            notes=["rotation products with bf16 inputs and fp32 accumulation (emulated by rounding on the CPU): "
                   "measures the convergence cost of the opt-in, not its GPU speed"],
        ),
    ]
    specs.append(_muon_spec())
    adamw, why_adamw = _family_class("AdamW", "adam")
    specs.append(OptimizerSpec("adamw", "AdamW (soap_optim)", "soap_optim", adamw, lambda h: h.adam(), unavailable=why_adamw))
    shampoo, why_shampoo = _family_class("Shampoo", "shampoo")
    specs.append(
        OptimizerSpec(
            "shampoo", "Shampoo", "soap_optim", shampoo, lambda h: dict(h.adam(), **_precond(h)), refresh,
            unavailable=why_shampoo,
        )
    )
    adafactor, why_adafactor = _family_class("Adafactor", "adafactor")
    specs.append(
        OptimizerSpec(
            "adafactor", "Adafactor", "soap_optim", adafactor,
            # Adafactor has no beta2 or eps in Adam's sense (its second-moment decay is a schedule).
            lambda h: dict(lr=h.lr, beta1=h.betas[0], weight_decay=h.weight_decay),
            unavailable=why_adafactor,
            notes=["Adafactor keeps its own second-moment decay schedule and eps; lr, beta1 and weight_decay are shared"],
        )
    )
    return specs


def _muon_spec() -> OptimizerSpec:
    """torch.optim.Muon on the hidden matrices, torch's AdamW on the rest, one lr (see ``muon``)."""
    from .muon import MuonWithAdamW, muon_available, split_groups

    why = muon_available()
    return OptimizerSpec(
        "torch-muon", "torch Muon + AdamW", f"torch {torch.__version__}", None if why else MuonWithAdamW,
        lambda h: dict(h.adam(), adjust_lr_fn="match_rms_adamw"),
        unavailable=why,
        params_of=split_groups,
        notes=["torch.optim.Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps: torch's defaults) on the 2-D "
               "weights that are neither an embedding nor the last Linear; AdamW(foreach) with the shared betas "
               "and eps on everything else; lr and weight_decay shared"],
    )


def all_specs(heavyball_compile: bool = False) -> List[OptimizerSpec]:
    from .peers import peers

    return ours() + peers(heavyball_compile=heavyball_compile)


def select(specs: List[OptimizerSpec], keys: Optional[List[str]]) -> Tuple[List[OptimizerSpec], List[str]]:
    """The specs to run (baseline first) and notes on the ones left out.

    ``keys`` None: every available one. Unknown keys raise ValueError; the baseline is always run, since
    every ratio in the report is to it.
    """
    by_key = {spec.key: spec for spec in specs}
    notes: List[str] = []
    if keys is None:
        chosen = [spec for spec in specs]
    else:
        unknown = [key for key in keys if key not in by_key]
        if unknown:
            raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(by_key)}")
        chosen = [by_key[key] for key in dict.fromkeys(keys)]
        if BASELINE not in keys:
            chosen.insert(0, by_key[BASELINE])
            notes.append(f"{BASELINE} added: every ratio is to it")
    runnable = []
    for spec in chosen:
        if spec.unavailable:
            notes.append(f"{spec.label} skipped: {spec.unavailable}")
        else:
            runnable.append(spec)
    return runnable, notes
