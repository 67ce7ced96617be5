"""The precision contract: the preconditioner's float32 products run at full float32 whatever the user's
global matmul settings.

Training scripts commonly call ``torch.set_float32_matmul_precision("high")`` (TF32 on Ampere and later)
or ``"medium"`` (bf16 products, also on CPUs with AVX-512-BF16 or AMX through oneDNN). Those settings
are right for a model's forward and backward, and wrong for the Kronecker factors: their spectra span
5-7 decades, and TF32's 10-bit mantissa misorders the small eigenvalue estimates diag(Q^T F Q) and turns
the bottom eigenvectors (a 0.1 eigenvalue can come back negative). So the factor accumulation, the
refresh (power step, eigenvalue estimates, QR input), the moment carry to a new basis, the outer-axis
projections and Shampoo's roots run inside :func:`full_float32_matmul`, which sets every float32
matmul backend to IEEE float32 and restores the user's settings on exit.

The rotations into and out of the eigenbasis are the exception: their precision is an explicit option
(``rotation_precision``), emulated bit for bit by the twins, so it never depends on global state.

Convolutions are not touched (``torch.backends.cudnn``): no optimizer step runs one.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, List, Tuple, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)
_depth = threading.local()  # nesting depth per thread: only the outermost guard touches the settings


def _backends() -> List[object]:
    """The per-backend precision objects of the float32 matmul (torch >= 2.9), or [] on older torch."""
    found = []
    for name in ("cuda", "mkldnn"):
        matmul = getattr(getattr(torch.backends, name, None), "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


_MATMUL_BACKENDS = _backends()


def _save_and_force() -> Tuple:
    if _MATMUL_BACKENDS:
        # Only the per-backend API: torch refuses to read the legacy global once the two APIs were mixed.
        saved = tuple(backend.fp32_precision for backend in _MATMUL_BACKENDS)
        for backend in _MATMUL_BACKENDS:
            if backend.fp32_precision != "ieee":
                backend.fp32_precision = "ieee"  # explicit: "none" would inherit a generic "tf32"/"bf16"
        return saved
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    return saved


def _restore(saved: Tuple) -> None:
    if _MATMUL_BACKENDS:
        for backend, value in zip(_MATMUL_BACKENDS, saved):
            if backend.fp32_precision != value:
                backend.fp32_precision = value
        return
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]


class full_float32_matmul:
    """Context manager (and decorator): float32 matmuls inside run at IEEE float32 on every backend.

    The user's settings come back on exit, also after an exception. Nested uses cost a counter only.
    Under ``torch.compile`` tracing it does nothing (the settings are read when the graph is compiled,
    and writing them there would break the graph); the eager step, the default, is always guarded.
    """

    __slots__ = ("_saved",)

    def __enter__(self) -> "full_float32_matmul":
        if _is_compiling():
            self._saved = None
            return self
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        if depth == 0:
            try:
                self._saved = _save_and_force()
            except BaseException:
                _depth.value = depth
                raise
        else:
            self._saved = None
        return self

    def __exit__(self, *exc) -> None:
        if _is_compiling():
            return None
        _depth.value -= 1
        if self._saved is not None:
            _restore(self._saved)
        return None

    def __call__(self, fn: _F) -> _F:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            with full_float32_matmul():
                return fn(*args, **kwargs)

        return guarded  # type: ignore[return-value]


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())
