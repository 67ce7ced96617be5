"""SOAP next to AdamW on a small real task: ``python -m soap_optim.demo`` (or ``soap-demo``).

A tiny causal transformer learns to predict the next byte of Python source code, taken from the
interpreter's own standard library, so the demo needs no download. The same model is trained twice from
the same initial weights on the same batches in the same order, once with :class:`soap_optim.SOAP` and once
with :class:`torch.optim.AdamW`, both with the same learning rate, betas, eps and weight decay: the one
difference is that SOAP runs Adam in the eigenbasis of Shampoo's preconditioner. It prints both training
losses as they go and, at the end, both losses on held-out text. The defaults take about a minute on two
CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import math
import sysconfig
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import soap_optim

TRAIN_BYTES = 1_000_000
HELDOUT_BYTES = 100_000
CONTEXT = 64  # bytes of context the model sees
BATCH_SIZE = 32
HELDOUT_WINDOWS = 256  # held-out loss is averaged over this many windows of CONTEXT bytes

# One set of hyperparameters for both optimizers (SOAP's defaults).
LR = 3e-3
BETAS = (0.95, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.01


def load_stdlib_text(train_bytes: int = TRAIN_BYTES, heldout_bytes: int = HELDOUT_BYTES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's top-level ``*.py`` files, read in sorted order.

    The first ``train_bytes`` are for training; the next ``heldout_bytes``, which come from files later in
    the order, are held out. The text is fixed for a given Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    needed = train_bytes + heldout_bytes
    chunks: List[bytes] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= needed:
            break
    if total < needed:
        raise RuntimeError(
            f"the demo needs {needed} bytes of Python source from the standard library in {stdlib}, "
            f"found only {total}; this Python may ship without its .py sources"
        )
    text = torch.frombuffer(bytearray(b"".join(chunks)[:needed]), dtype=torch.uint8).long()
    return text[:train_bytes], text[train_bytes:]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nn.Module):
    """A next-byte predictor over a window of ``context`` bytes."""

    def __init__(self, context: int = CONTEXT, width: int = 96, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.byte_embedding = nn.Embedding(256, width)
        self.position_embedding = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.byte_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_on(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over windows of CONTEXT + 1 bytes."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))


def batch_order(text: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Start offsets of every training window, shape (steps, BATCH_SIZE), drawn once for both runs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(text) - CONTEXT - 1, (steps, BATCH_SIZE), generator=generator)


def windows_at(text: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return text[starts.unsqueeze(1) + torch.arange(CONTEXT + 1)]


class Run:
    """One model with its optimizer, and its running totals."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.seconds = 0.0
        self.recent_losses: List[float] = []

    def train_step(self, windows: torch.Tensor) -> None:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_on(self.model, windows)
        loss.backward()
        self.optimizer.step()
        self.seconds += time.perf_counter() - started
        self.recent_losses.append(loss.item())

    def take_mean_loss(self) -> float:
        """Mean training loss since the last call."""
        mean = sum(self.recent_losses) / len(self.recent_losses)
        self.recent_losses.clear()
        return mean

    @torch.no_grad()
    def heldout_loss(self, heldout: torch.Tensor) -> float:
        self.model.eval()
        loss = loss_on(self.model, heldout).item()
        self.model.train()
        return loss


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soap-demo",
        description="Train a small byte-level transformer on Python standard-library source with SOAP "
        "and with AdamW, side by side, and compare their losses.",
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps for each optimizer (default: 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order (default: 0)")
    parser.add_argument("--log-every", type=int, default=50, help="print the losses every this many steps (default: 50)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.log_every < 1:
        parser.error(f"--log-every must be at least 1, got {args.log_every}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    train_text, heldout_text = load_stdlib_text()
    heldout_starts = torch.arange(HELDOUT_WINDOWS) * ((len(heldout_text) - CONTEXT - 1) // HELDOUT_WINDOWS)
    heldout = windows_at(heldout_text, heldout_starts)
    order = batch_order(train_text, args.steps, args.seed)

    torch.manual_seed(args.seed)
    model = ByteTransformer()
    twin = copy.deepcopy(model)  # the same initial weights for both runs
    hyperparameters = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    runs = [
        Run("SOAP", model, soap_optim.SOAP(model.parameters(), **hyperparameters)),
        Run("AdamW", twin, torch.optim.AdamW(twin.parameters(), **hyperparameters)),
    ]

    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"byte-level transformer, {parameters:,} parameters; {len(train_text):,} training bytes of Python "
        f"standard-library source; {args.steps} steps of {BATCH_SIZE}x{CONTEXT} bytes; "
        f"lr={LR}, betas={BETAS}, weight_decay={WEIGHT_DECAY}; seed {args.seed}"
    )
    print(f"initial held-out loss: {runs[0].heldout_loss(heldout):.4f} nats/byte (ln 256 = {math.log(256):.4f})")
    print(f"{'step':>6}  {'SOAP loss':>10}  {'AdamW loss':>10}  (training loss, mean over the steps since the last line)")
    for step in range(1, args.steps + 1):
        windows = windows_at(train_text, order[step - 1])
        for run in runs:
            run.train_step(windows)
        if step % args.log_every == 0 or step == args.steps:
            soap_loss, adamw_loss = (run.take_mean_loss() for run in runs)
            print(f"{step:>6}  {soap_loss:>10.4f}  {adamw_loss:>10.4f}", flush=True)

    print(f"\nheld-out loss after {args.steps} steps ({HELDOUT_WINDOWS} windows of {CONTEXT} bytes from other files):")
    results = {}
    for run in runs:
        results[run.name] = run.heldout_loss(heldout)
        print(
            f"  {run.name:<6} {results[run.name]:.4f} nats/byte = {results[run.name] / math.log(2):.3f} bits/byte"
            f"   ({1000 * run.seconds / args.steps:.1f} ms per training step)"
        )
    difference = results["AdamW"] - results["SOAP"]
    better = "SOAP" if difference > 0 else "AdamW"
    print(f"  {better} is lower by {abs(difference):.4f} nats/byte")


if __name__ == "__main__":
    main()
