"""The benchmark's data and models: all built offline from what Python, torch and scikit-learn ship.

* :func:`load_stdlib_corpus`: bytes of the standard library's own ``*.py`` files, split by file.
* :func:`gpt`: a byte-level GPT (the demo's :class:`~soap_optim.demo.ByteTransformer`).
* :func:`mlp`: a stack of transformer-style MLP blocks, for step timing.
* :func:`load_digits_split` and :func:`digits_cnn`: scikit-learn's bundled 8x8 digits and a small CNN.
* :class:`KroneckerQuadratic`: a least-squares problem whose row and column spaces are badly scaled.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from soap_optim.demo import ByteTransformer

VOCAB = 256  # byte-level: one token per byte value
HELDOUT_EVERY = 8  # every 8th file (in sorted order) is held out, so both splits span the alphabet


@dataclass
class Corpus:
    train: torch.Tensor  # int64 byte values
    heldout: torch.Tensor
    train_files: List[str]
    heldout_files: List[str]
    sha256: str  # of train bytes + held-out bytes, to tell whether two machines saw the same text
    root: str
    validation: Optional[torch.Tensor] = None  # held-out files after the reported ones, for choosing lr
    validation_files: Optional[List[str]] = None


def load_stdlib_corpus(train_bytes: int, heldout_bytes: int, validation_bytes: int = 0) -> Corpus:
    """Bytes of the standard library's top-level ``*.py`` files, in sorted order, split by file.

    File ``i`` of the sorted list is held out when ``i % 8 == 7``; the rest are for training. Each
    split is the concatenation of its files, cut to the requested number of bytes, so no file
    contributes to both. The text depends only on the Python version (its standard library).
    ``validation_bytes`` > 0 adds a third split, from the held-out files that come after the
    reported ones: text neither trained on nor reported, on which learning rates are chosen.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    splits: Dict[str, Tuple[List[bytes], List[str], int]] = {
        "train": ([], [], train_bytes), "heldout": ([], [], heldout_bytes), "validation": ([], [], validation_bytes),
    }
    for index, path in enumerate(files):
        held_out = index % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if held_out and sum(map(len, splits["heldout"][0])) >= heldout_bytes:
            chunks, names, wanted = splits["validation"]
        else:
            chunks, names, wanted = splits["heldout" if held_out else "train"]
        if sum(map(len, chunks)) < wanted:
            chunks.append(path.read_bytes())
            names.append(path.name)
    tensors = {}
    for name, (chunks, _, wanted) in splits.items():
        data = b"".join(chunks)[:wanted]
        if len(data) < wanted:
            raise RuntimeError(
                f"the language-model task needs {wanted:,} {name} bytes of Python source from the standard "
                f"library in {root}, found {len(data):,}; this Python may ship without its .py sources "
                f"(leave out the task with --tasks step,digits,lstsq)"
            )
        tensors[name] = data
    digest = hashlib.sha256(tensors["train"] + tensors["heldout"]).hexdigest()
    return Corpus(
        train=_as_tokens(tensors["train"]),
        heldout=_as_tokens(tensors["heldout"]),
        train_files=splits["train"][1],
        heldout_files=splits["heldout"][1],
        sha256=digest,
        root=str(root),
        validation=_as_tokens(tensors["validation"]) if validation_bytes else None,
        validation_files=splits["validation"][1] if validation_bytes else None,
    )


def _as_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows_at(text: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """Rows of ``context + 1`` consecutive bytes starting at ``starts``: inputs and next-byte targets."""
    return text[starts.unsqueeze(1) + torch.arange(context + 1, device=starts.device)]


def batch_starts(text_len: int, steps: int, batch_size: int, context: int, seed: int) -> torch.Tensor:
    """Start offsets of every training window, shape (steps, batch_size); one draw for every optimizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, text_len - context - 1, (steps, batch_size), generator=generator)


def heldout_starts(text_len: int, windows: int, context: int) -> torch.Tensor:
    """Evenly spaced, fixed windows over the held-out text."""
    stride = (text_len - context - 1) // windows
    if stride < 1:
        raise ValueError(f"held-out text of {text_len} bytes is too short for {windows} windows of {context} bytes")
    return torch.arange(windows) * stride


def next_byte_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


def gpt_heads(width: int) -> int:
    """Attention heads for a given width: 4 (the demo's choice), so ``width`` must be a multiple of 4."""
    if width < 4 or width % 4:
        raise ValueError(f"width must be a positive multiple of 4 (4 attention heads), got {width}")
    return 4


def gpt(width: int, depth: int, context: int) -> nn.Module:
    """Byte-level causal transformer: embeddings, ``depth`` pre-norm blocks, a 256-way head."""
    return ByteTransformer(context=context, width=width, heads=gpt_heads(width), layers=depth)


def mlp(width: int, depth: int) -> nn.Module:
    """``depth`` blocks of Linear(width, 4 width), GELU, Linear(4 width, width): a transformer's MLP stack."""
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*layers)


def describe_model(model: nn.Module) -> Dict[str, object]:
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "shapes": sorted({tuple(p.shape) for p in params}, key=lambda s: (-math.prod(s), s)),
    }


# ------------------------------------------------------------------------------------------ digits
@dataclass
class Digits:
    train_x: torch.Tensor  # (n, 1, 8, 8) float32, pixel values scaled to [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: Optional[torch.Tensor] = None  # set aside from the training images when asked for
    val_y: Optional[torch.Tensor] = None


def sklearn_missing() -> Optional[str]:
    """None when scikit-learn imports, else why it does not."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as error:
        return f"scikit-learn is not installed ({error}); install the bench extra to run the digits task"
    return None


def load_digits_split(seed: int, test_fraction: float = 0.2, validation_fraction: float = 0.0) -> Digits:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split once by a seeded permutation.

    The test split is the same whatever ``validation_fraction``; a validation split, when asked for, is
    taken from the training images (which then shrink by as many).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_size = int(round(test_fraction * len(labels)))
    val_size = int(round(validation_fraction * len(labels)))
    test, val, train = order[:test_size], order[test_size:test_size + val_size], order[test_size + val_size:]
    if not val_size:
        return Digits(images[train], labels[train], images[test], labels[test])
    return Digits(images[train], labels[train], images[test], labels[test], images[val], labels[val])


def digits_cnn() -> nn.Module:
    """Two 3x3 convolutions, a 2x2 average pool and a linear classifier (about 10k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def digits_mlp(hidden: int = 128, classes: int = 10) -> nn.Module:
    """The classifier of a first tutorial: flatten, Linear(64, hidden), ReLU, Linear(hidden, classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))


# ------------------------------------------------------------------------------ least squares
class KroneckerQuadratic(nn.Module):
    """f(W) = 1/2 tr((W - W*)^T H_L (W - W*) H_R), i.e. 1/2 ||A (W - W*) B||_F^2 with H_L = A^T A, H_R = B B^T.

    H_L and H_R have eigenvalues spaced log-uniformly over ``[1 / condition, 1]`` in random orthonormal
    bases, so the Hessian H_R (x) H_L has condition number ``condition**2`` and its eigenvectors are
    rotated away from the coordinate axes: a diagonal preconditioner (Adam) cannot undo that scaling, a
    Kronecker-factored one can. The minimum is 0, at W = W*, and the start is W = 0.
    """

    def __init__(self, rows: int, cols: int, condition: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("h_left", _badly_scaled_spd(rows, condition, generator))
        self.register_buffer("h_right", _badly_scaled_spd(cols, condition, generator))
        self.register_buffer("target", torch.randn(rows, cols, generator=generator))
        self.weight = nn.Parameter(torch.zeros(rows, cols))
        with torch.no_grad():
            self.initial_value = float(self.forward())

    def forward(self) -> torch.Tensor:
        error = self.weight - self.target
        return 0.5 * (error * (self.h_left @ error @ self.h_right)).sum()

    @torch.no_grad()
    def relative_error(self) -> float:
        """f(W) / f(W_0): the objective gap relative to the start (the optimum is 0)."""
        return float(self.forward()) / self.initial_value


def _badly_scaled_spd(n: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a proper Haar-random rotation
    eigenvalues = torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).float()
