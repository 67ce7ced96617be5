"""The training tasks as seed-parameterised problems: what one seed's runs start from and see.

A :class:`Task` holds what does not change with the seed (data, steps, schedule, description); its
``build(seed)`` gives a :class:`Problem`: the initial weights (every optimizer starts from a copy), the
batch of each step, the loss, and the evaluation. The seed sets the initial weights and the batch order;
data splits stay fixed, so seeds differ only in what an optimizer cannot control.

Evaluations always report ``loss`` on the reported split; with ``validation=True`` they also report
``val_loss`` on a separate split (files of text, or images, that are neither trained on nor reported),
on which ``--tune`` picks learning rates. The least-squares task has no data: its selection runs use
other problem instances (``selection_seed_offset``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tasks
from .training import warmup_cosine

LSTSQ_TARGET = 1e-6
SELECTION_SEED_OFFSET = 1000  # least squares: lr chosen on instances seed + 1000, ...


@dataclass
class Problem:
    base: nn.Module
    batch_at: Callable[[int], Any]
    loss_of: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], Dict[str, float]]


@dataclass
class Task:
    name: str
    description: str
    steps: int
    eval_every: int
    schedule: Callable[[int], float]
    schedule_text: str
    build: Callable[[int], Problem]
    lrs: Tuple[float, ...]  # the shared lr(s) of this task
    info: Dict[str, Any] = field(default_factory=dict)
    target: Optional[float] = None  # fixed target; None: AdamW's final loss
    extra: List[str] = field(default_factory=list)
    changes: Dict[str, Any] = field(default_factory=dict)  # hyperparameters this task always sets
    has_validation: bool = False  # evaluations report val_loss
    selection_seed_offset: Optional[int] = None  # no validation split: choose lr on other instances


def eval_every(steps: int, evals: int) -> int:
    return max(1, steps // max(1, evals))


def _warmup_cosine(settings) -> Tuple[Callable[[int], float], str]:
    """The language-model and digits schedule over ``settings.steps``, and its description."""
    return (
        warmup_cosine(settings.steps, settings.warmup_fraction),
        f"{settings.warmup_fraction:.0%} linear warm-up, then cosine decay to 0",
    )


def _no_grad_eval(model: nn.Module, measure: Callable[[nn.Module], Dict[str, float]]) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        values = measure(model)
    model.train(was_training)
    return values


def language_model(settings, device: torch.device, validation: bool = False) -> Task:
    corpus = tasks.load_stdlib_corpus(settings.train_bytes, settings.heldout_bytes, settings.heldout_bytes if validation else 0)
    splits = {"loss": corpus.heldout, **({"val_loss": corpus.validation} if validation else {})}
    windows = {
        name: tasks.windows_at(text, tasks.heldout_starts(len(text), settings.heldout_windows, settings.context), settings.context).to(device)
        for name, text in splits.items()
    }

    def build(seed: int) -> Problem:
        starts = tasks.batch_starts(len(corpus.train), settings.steps, settings.batch_size, settings.context, seed)
        torch.manual_seed(seed)
        base = tasks.gpt(settings.width, settings.depth, settings.context).to(device)
        return Problem(
            base,
            batch_at=lambda step: tasks.windows_at(corpus.train, starts[step], settings.context).to(device),
            loss_of=tasks.next_byte_loss,
            evaluate=lambda model: _no_grad_eval(
                model, lambda m: {name: tasks.next_byte_loss(m, w).item() for name, w in windows.items()}
            ),
        )

    model = tasks.gpt(settings.width, settings.depth, settings.context)
    return Task(
        "lm",
        "byte-level GPT on Python standard-library source; held-out next-byte loss (nats/byte)",
        settings.steps,
        eval_every(settings.steps, settings.evals),
        *_warmup_cosine(settings),
        build,
        settings.lrs,
        info={
            "model": {"width": settings.width, "depth": settings.depth, "context": settings.context, **tasks.describe_model(model)},
            "data": {
                "root": corpus.root,
                "train_bytes": len(corpus.train),
                "heldout_bytes": len(corpus.heldout),
                "train_files": len(corpus.train_files),
                "heldout_files": corpus.heldout_files,
                "validation_files": corpus.validation_files,
                "sha256": corpus.sha256,
                "batch": [settings.batch_size, settings.context],
                "heldout_windows": settings.heldout_windows,
            },
        },
        has_validation=validation,
    )


def _classification(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
    }


def _digits_evaluate(data: tasks.Digits, device: torch.device, validation: bool) -> Callable[[nn.Module], Dict[str, float]]:
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    val = (data.val_x.to(device), data.val_y.to(device)) if validation else None

    def measure(model: nn.Module) -> Dict[str, float]:
        values = _classification(model(test_x), test_y)
        if val is not None:
            values["val_loss"] = F.cross_entropy(model(val[0]), val[1]).item()
        return values

    return lambda model: _no_grad_eval(model, measure)


def _batches(data: tasks.Digits, rows: torch.Tensor, device: torch.device) -> Callable[[int], Any]:
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)

    def batch_at(step: int):
        index = rows[step].to(device)
        return train_x[index], train_y[index]

    return batch_at


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _draw_rows(count: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, count, (steps, batch_size), generator=torch.Generator().manual_seed(seed))


def _digits_info(model: nn.Module, data: tasks.Digits, batch_size: int) -> Dict[str, Any]:
    return {
        "model": tasks.describe_model(model),
        "data": {"train": len(data.train_y), "test": len(data.test_y), "batch": batch_size,
                 "validation": 0 if data.val_y is None else len(data.val_y)},
    }


VALIDATION_FRACTION = 0.1  # of all digits images, taken from the training ones, when a task needs it


def digits(settings, device: torch.device, validation: bool = False) -> Task:
    data = tasks.load_digits_split(settings.seed, validation_fraction=VALIDATION_FRACTION if validation else 0.0)
    evaluate = _digits_evaluate(data, device, validation)

    def build(seed: int) -> Problem:
        rows = _draw_rows(len(data.train_y), settings.steps, settings.batch_size, seed)
        torch.manual_seed(seed)
        return Problem(tasks.digits_cnn().to(device), _batches(data, rows, device), _cross_entropy, evaluate)

    return Task(
        "digits",
        "small CNN on scikit-learn's 8x8 digits; test cross-entropy (and accuracy)",
        settings.steps,
        eval_every(settings.steps, settings.evals),
        *_warmup_cosine(settings),
        build,
        settings.lrs,
        info=_digits_info(tasks.digits_cnn(), data, settings.batch_size),
        extra=["accuracy"],
        has_validation=validation,
    )


PRETRAIN_CLASSES = 5  # the fine-tune task's body is first trained on digits 0-4 only
PRETRAIN_STEPS = 100
PRETRAIN_LR = 3e-3


def _pretrained_body(data: tasks.Digits, batch_size: int, seed: int) -> nn.Module:
    """The fine-tune task's starting point: an MLP trained by AdamW on digits 0-4, with a fresh 10-way head.

    Built on the CPU, seeded, so every optimizer (and every machine) starts from the same weights.
    """
    torch.manual_seed(seed)
    model = tasks.digits_mlp(classes=PRETRAIN_CLASSES)
    keep = (data.train_y < PRETRAIN_CLASSES).nonzero().squeeze(1)
    rows = keep[_draw_rows(len(keep), PRETRAIN_STEPS, batch_size, seed + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    for step in range(PRETRAIN_STEPS):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.train_x[rows[step]]), data.train_y[rows[step]]).backward()
        optimizer.step()
    model[-1] = nn.Linear(model[-1].in_features, 10)
    return model


def finetune(settings, device: torch.device, validation: bool = False) -> Task:
    data = tasks.load_digits_split(settings.seed, validation_fraction=VALIDATION_FRACTION if validation else 0.0)
    evaluate = _digits_evaluate(data, device, validation)
    steps = settings.finetune_steps

    def build(seed: int) -> Problem:
        base = _pretrained_body(data, settings.batch_size, seed).to(device)
        rows = _draw_rows(len(data.train_y), steps, settings.batch_size, seed)
        return Problem(base, _batches(data, rows, device), _cross_entropy, evaluate)

    return Task(
        "finetune",
        f"fine-tune: an MLP classifier pretrained on digits 0-{PRETRAIN_CLASSES - 1} ({PRETRAIN_STEPS} AdamW steps), "
        "new 10-way head, all weights trained on all digits at a constant lr; test cross-entropy (and accuracy)",
        steps,
        eval_every(steps, settings.evals),
        lambda step: 1.0,
        "constant lr (no scheduler, as in a first training loop)",
        build,
        settings.finetune_lrs,
        info=_digits_info(tasks.digits_mlp(), data, settings.batch_size),
        extra=["accuracy"],
        has_validation=validation,
    )


def least_squares(settings, device: torch.device, validation: bool = False) -> Task:
    def build(seed: int) -> Problem:
        base = tasks.KroneckerQuadratic(settings.lstsq_rows, settings.lstsq_cols, settings.lstsq_condition, seed).to(device)

        @torch.no_grad()
        def evaluate(model):
            distance = (model.weight - model.target).norm() / model.target.norm()
            return {"loss": model.relative_error(), "distance": distance.item()}

        return Problem(base, lambda step: None, lambda model, batch: model(), evaluate)

    steps = settings.lstsq_steps
    return Task(
        "lstsq",
        f"`min_W 1/2 tr((W-W*)^T H_L (W-W*) H_R)`, W {settings.lstsq_rows}x{settings.lstsq_cols}, "
        f"cond(H_L) = cond(H_R) = {settings.lstsq_condition:g} in random bases; metric f(W)/f(W0)",
        steps,
        1,
        warmup_cosine(steps, 0.0),
        "cosine decay to 0, no weight decay",
        build,
        settings.lstsq_lrs,
        target=LSTSQ_TARGET,
        extra=["distance"],
        # No weight decay: it would move the optimum away from W*.
        changes={"weight_decay": 0.0},
        selection_seed_offset=SELECTION_SEED_OFFSET,
    )


TASKS = {"lm": language_model, "digits": digits, "finetune": finetune, "lstsq": least_squares}
