"""The benchmark's parts; each returns a JSON-ready section of the results.

* ``step``: ``step()`` time and state bytes on an MLP and on a GPT-style transformer (:mod:`.timing`);
* ``lm``: held-out loss of a byte-level GPT trained on the standard library's Python source;
* ``digits``: test loss and accuracy of a small CNN on scikit-learn's bundled digits;
* ``finetune``: a pretrained MLP classifier fine-tuned on the digits at a constant lr;
* ``lstsq``: a least-squares problem with badly scaled row and column spaces and a known optimum.

The training tasks are defined in :mod:`.problems`; here they run on one seed (``PARTS``) or, with
``--seeds``, ``--tune`` or ``--swap``, in their seeded form (``SEEDED_PARTS``, :mod:`.evidence`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import problems, tasks
from .evidence import seeded_part
from .optimizers import BASELINE, SOAP_DEFAULTS, Hyper, OptimizerSpec
from .progress import Progress
from .seeded import pairs, train_seed
from .timing import measure_steps, plan_calls
from .training import summarize

TRAINING = ("lm", "digits", "finetune", "lstsq")
TASKS = ("step", *TRAINING)


@dataclass
class Settings:
    """Everything a run depends on besides the machine; recorded in the results."""

    tasks: Tuple[str, ...] = TASKS
    steps: int = 300  # training steps of the lm and digits tasks
    width: int = 64
    depth: int = 2
    context: int = 64
    batch_size: int = 32
    lrs: Tuple[float, ...] = (1e-2,)
    betas: Tuple[float, float] = SOAP_DEFAULTS["betas"]  # shared by every optimizer: SOAP's defaults
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = SOAP_DEFAULTS["precondition_frequency"]
    max_precond_dim: int = 10000
    warmup_fraction: float = 0.05  # of the lm and digits steps; then cosine decay to 0
    evals: int = 20  # held-out evaluations per training run (plus one at step 0)
    train_bytes: int = 1_000_000
    heldout_bytes: int = 100_000
    heldout_windows: int = 128
    timing_warmup: int = 20
    timing_periods: int = 3
    lstsq_steps: int = 1000
    lstsq_rows: int = 48
    lstsq_cols: int = 24
    lstsq_condition: float = 1e3
    lstsq_lrs: Tuple[float, ...] = (3e-2,)
    finetune_steps: int = 200
    finetune_lrs: Tuple[float, ...] = (3e-3,)  # a first classifier's lr
    seed: int = 0
    seeds: int = 1  # more than 1, or tune or swap: the training tasks run in their seeded form
    tune: bool = False
    tune_grid: Tuple[float, ...] = (0.3, 1.0, 3.0, 6.0)  # multiples of each task's shared lr
    swap: bool = False
    swap_lr_multiplier: float = 3.0
    preset: Optional[str] = None
    heavyball_compile: bool = False
    progress: bool = True

    def hyper(self, lr: float, **changes: Any) -> Hyper:
        return Hyper(
            lr=lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            precondition_frequency=self.precondition_frequency,
            max_precond_dim=self.max_precond_dim,
        ).with_(**changes)

    @property
    def seeded(self) -> bool:
        return self.seeds > 1 or self.tune or self.swap

    def as_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------- step time
def step_time(settings: Settings, specs: List[OptimizerSpec], device: torch.device) -> Dict[str, Any]:
    hyper = settings.hyper(settings.lrs[0])
    models = {
        "mlp": (
            f"MLP: {settings.depth} blocks of Linear({settings.width}, {4 * settings.width}), GELU, "
            f"Linear({4 * settings.width}, {settings.width})",
            lambda: tasks.mlp(settings.width, settings.depth),
        ),
        "gpt": (
            f"GPT: byte-level transformer, width {settings.width}, depth {settings.depth}, "
            f"context {settings.context}, 4 heads, 256-byte vocabulary",
            lambda: tasks.gpt(settings.width, settings.depth, settings.context),
        ),
    }
    section: Dict[str, Any] = {"hyper": asdict(hyper)}
    for name, (description, factory) in models.items():
        calls = sum(plan_calls(specs, hyper, settings.timing_warmup, settings.timing_periods))
        with Progress(calls, f"step time, {name}", settings.progress) as bar:
            result = measure_steps(
                specs,
                factory,
                hyper,
                warmup=settings.timing_warmup,
                periods=settings.timing_periods,
                device=device,
                seed=settings.seed,
                progress=bar,
            )
        section[name] = {"model": description, **result}
    return section


# ------------------------------------------------------------------------------------ training
def single_seed(name: str):
    """The one-seed form of a training task: every optimizer at each of the task's lrs, its best reported."""

    def part(settings: Settings, specs: List[OptimizerSpec], device: torch.device) -> Dict[str, Any]:
        task = problems.TASKS[name](settings, device)
        chosen = pairs(specs, [settings.hyper(lr, **task.changes) for lr in task.lrs])
        with Progress(task.steps, task.description.split(";")[0], settings.progress) as bar:
            runs = train_seed(task, chosen, settings.seed, device, bar)
        return {
            "task": task.description,
            **task.info,
            "steps": task.steps,
            "eval_every": task.eval_every,
            **summarize(runs, BASELINE, steps=task.steps, target=task.target, extra=task.extra),
        }

    return part


def seeded(name: str):
    return lambda settings, specs, device, swap_specs: seeded_part(name, settings, specs, device, swap_specs)


PARTS = {"step": step_time, **{name: single_seed(name) for name in TRAINING}}
SEEDED_PARTS = {name: seeded(name) for name in TRAINING}


def skip_reason(task: str) -> Optional[str]:
    if task in ("digits", "finetune"):
        return tasks.sklearn_missing()
    return None
