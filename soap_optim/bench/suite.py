"""The benchmark's parts; each returns a JSON-ready section of the results.

* ``step``: ``step()`` time and state bytes on an MLP and on a GPT-style transformer (:mod:`.timing`);
* ``lm``: held-out loss of a byte-level GPT trained on the standard library's Python source;
* ``digits``: test loss and accuracy of a small CNN on scikit-learn's bundled digits;
* ``lstsq``: a least-squares problem with badly scaled row and column spaces and a known optimum.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import tasks
from .optimizers import BASELINE, Hyper, OptimizerSpec
from .progress import Progress
from .timing import measure_steps, plan_calls
from .training import Run, summarize, train_interleaved, warmup_cosine

TASKS = ("step", "lm", "digits", "lstsq")
LSTSQ_TARGET = 1e-6


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
    betas: Tuple[float, float] = (0.95, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
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
    seed: int = 0
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
def _make_runs(
    specs: List[OptimizerSpec], base: torch.nn.Module, hypers: List[Hyper]
) -> List[Run]:
    runs = []
    for hyper in hypers:
        for spec in specs:
            model = copy.deepcopy(base)
            try:
                optimizer = spec.make(model.parameters(), hyper)
                runs.append(Run(spec.key, spec.label, hyper.lr, model, optimizer))
            except Exception as error:
                runs.append(Run(spec.key, spec.label, hyper.lr, model, None, error=f"{type(error).__name__}: {error}"))
    return runs


def _eval_every(steps: int, evals: int) -> int:
    return max(1, steps // max(1, evals))


def language_model(settings: Settings, specs: List[OptimizerSpec], device: torch.device) -> Dict[str, Any]:
    corpus = tasks.load_stdlib_corpus(settings.train_bytes, settings.heldout_bytes)
    starts = tasks.batch_starts(len(corpus.train), settings.steps, settings.batch_size, settings.context, settings.seed)
    heldout = tasks.windows_at(
        corpus.heldout, tasks.heldout_starts(len(corpus.heldout), settings.heldout_windows, settings.context), settings.context
    ).to(device)
    torch.manual_seed(settings.seed)
    base = tasks.gpt(settings.width, settings.depth, settings.context).to(device)
    runs = _make_runs(specs, base, [settings.hyper(lr) for lr in settings.lrs])

    @torch.no_grad()
    def evaluate(model):
        model.eval()
        loss = tasks.next_byte_loss(model, heldout).item()
        model.train()
        return {"loss": loss}

    with Progress(settings.steps, "language model", settings.progress) as bar:
        train_interleaved(
            runs,
            steps=settings.steps,
            batch_at=lambda step: tasks.windows_at(corpus.train, starts[step], settings.context).to(device),
            loss_of=tasks.next_byte_loss,
            evaluate=evaluate,
            eval_every=_eval_every(settings.steps, settings.evals),
            schedule=warmup_cosine(settings.steps, settings.warmup_fraction),
            device=device,
            progress=bar,
        )
    return {
        "task": "byte-level GPT on Python standard-library source; held-out next-byte loss (nats/byte)",
        "model": {"width": settings.width, "depth": settings.depth, "context": settings.context, **tasks.describe_model(base)},
        "data": {
            "root": corpus.root,
            "train_bytes": len(corpus.train),
            "heldout_bytes": len(corpus.heldout),
            "train_files": len(corpus.train_files),
            "heldout_files": corpus.heldout_files,
            "sha256": corpus.sha256,
            "batch": [settings.batch_size, settings.context],
            "heldout_windows": settings.heldout_windows,
        },
        "steps": settings.steps,
        "eval_every": _eval_every(settings.steps, settings.evals),
        **summarize(runs, BASELINE, steps=settings.steps),
    }


def digits(settings: Settings, specs: List[OptimizerSpec], device: torch.device) -> Dict[str, Any]:
    data = tasks.load_digits_split(settings.seed)
    order = torch.randint(
        0, len(data.train_y), (settings.steps, settings.batch_size), generator=torch.Generator().manual_seed(settings.seed)
    )
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    torch.manual_seed(settings.seed)
    base = tasks.digits_cnn().to(device)
    runs = _make_runs(specs, base, [settings.hyper(lr) for lr in settings.lrs])

    @torch.no_grad()
    def evaluate(model):
        logits = model(test_x)
        return {
            "loss": F.cross_entropy(logits, test_y).item(),
            "accuracy": (logits.argmax(dim=1) == test_y).float().mean().item(),
        }

    def batch_at(step):
        rows = order[step].to(device)
        return train_x[rows], train_y[rows]

    with Progress(settings.steps, "digits", settings.progress) as bar:
        train_interleaved(
            runs,
            steps=settings.steps,
            batch_at=batch_at,
            loss_of=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
            evaluate=evaluate,
            eval_every=_eval_every(settings.steps, settings.evals),
            schedule=warmup_cosine(settings.steps, settings.warmup_fraction),
            device=device,
            progress=bar,
        )
    return {
        "task": "small CNN on scikit-learn's 8x8 digits; test cross-entropy (and accuracy)",
        "model": tasks.describe_model(base),
        "data": {"train": len(data.train_y), "test": len(data.test_y), "batch": settings.batch_size},
        "steps": settings.steps,
        "eval_every": _eval_every(settings.steps, settings.evals),
        **summarize(runs, BASELINE, steps=settings.steps, extra=["accuracy"]),
    }


def least_squares(settings: Settings, specs: List[OptimizerSpec], device: torch.device) -> Dict[str, Any]:
    base = tasks.KroneckerQuadratic(settings.lstsq_rows, settings.lstsq_cols, settings.lstsq_condition, settings.seed).to(device)
    # No weight decay: it would move the optimum away from W*.
    runs = _make_runs(specs, base, [settings.hyper(lr, weight_decay=0.0) for lr in settings.lstsq_lrs])

    @torch.no_grad()
    def evaluate(model):
        distance = (model.weight - model.target).norm() / model.target.norm()
        return {"loss": model.relative_error(), "distance": distance.item()}

    steps = settings.lstsq_steps
    with Progress(steps, "least squares", settings.progress) as bar:
        train_interleaved(
            runs,
            steps=steps,
            batch_at=lambda step: None,
            loss_of=lambda model, batch: model(),
            evaluate=evaluate,
            eval_every=1,
            schedule=warmup_cosine(steps, 0.0),
            device=device,
            progress=bar,
        )
    return {
        "task": (
            f"`min_W 1/2 tr((W-W*)^T H_L (W-W*) H_R)`, W {settings.lstsq_rows}x{settings.lstsq_cols}, "
            f"cond(H_L) = cond(H_R) = {settings.lstsq_condition:g} in random bases; metric f(W)/f(W0)"
        ),
        "steps": steps,
        "eval_every": 1,
        **summarize(runs, BASELINE, steps=steps, target=LSTSQ_TARGET, extra=["distance"]),
    }


PARTS = {"step": step_time, "lm": language_model, "digits": digits, "lstsq": least_squares}


def skip_reason(task: str) -> Optional[str]:
    if task == "digits":
        return tasks.sklearn_missing()
    return None
