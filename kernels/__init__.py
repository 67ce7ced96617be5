"""Fused Triton kernels for the SOAP step, installed as ``soap_optim.kernels``.

Each fused operation has a pure-PyTorch twin with the same signature: the twin is the path taken on the
CPU (or wherever Triton can't run) and the oracle the kernel tests compare against.

The four operations, each on a bucket of B same-shaped matrices stacked as ``[B, m, n]`` (SOAP's
merged 2-D layout), with a basis of ``None`` meaning the identity on that side:

* ``factor_ema_(left, right, grad, beta)``: L <- beta L + (1 - beta) G G^T, R <- beta R + (1 - beta) G^T G.
* ``rotate_adam_(grad, q_left, q_right, exp_avg, exp_avg_sq, *, beta1, beta2, eps, precision)``:
  G~ = Q_L^T G Q_R, Adam's moments updated with G~, returns exp_avg / (sqrt(exp_avg_sq) + eps).
* ``unrotate_apply_(direction, q_left, q_right, params, *, step_size, decay, normalize, precision)``:
  U = Q_L N Q_R^T (optionally scaled to unit RMS), params <- (1 - decay) (params - step_size[b] U).
* ``adam_(params, grads, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step_size, denom_scale, decay,
  decay_first)``: elementwise Adam on a list of tensors.

``precision`` (``PRECISIONS``: "fp32", "tf32x3", "tf32", "bf16") says how the operands of the rotation
products are rounded; the twins round them exactly as the kernels do (see ``reference``). Tiles are
chosen by shape rules, never by timing, so every process computes the same bits.

``get_ops(fused)`` returns the four as a namespace, from Triton (``fused=True``) or from the twins in
``reference``. Triton is optional: it is imported only when fused ops are requested. On CPU tensors the
fused ops run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import importlib
import types

from .reference import PRECISIONS, adam_, factor_ema_, rotate_adam_, unrotate_apply_

__all__ = [
    "PRECISIONS",
    "adam_",
    "factor_ema_",
    "get_ops",
    "rotate_adam_",
    "triton_available",
    "unrotate_apply_",
]

_OP_MODULES = {
    "factor_ema_": "factor_ema",
    "rotate_adam_": "rotate_adam",
    "unrotate_apply_": "unrotate_apply",
    "adam_": "adam",
}
_triton_error = None  # why triton could not be imported, once tried


def triton_available() -> bool:
    """Whether Triton can be imported (it is not imported by ``import soap_optim.kernels``)."""
    global _triton_error
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as error:  # ImportError, or a broken install raising something else
        _triton_error = f"{type(error).__name__}: {error}"
        return False
    return True


def get_ops(fused: bool) -> types.SimpleNamespace:
    """The four SOAP-step ops: Triton launchers if ``fused``, else the pure-PyTorch twins.

    Both sets share signatures and semantics. ``fused=True`` raises RuntimeError when Triton is not
    importable, or when there is no CUDA device and Triton's interpreter is off.
    """
    if not fused:
        return types.SimpleNamespace(
            factor_ema_=factor_ema_, rotate_adam_=rotate_adam_, unrotate_apply_=unrotate_apply_, adam_=adam_
        )
    if not triton_available():
        raise RuntimeError(f"fused SOAP kernels need Triton, which could not be imported ({_triton_error})")
    common = importlib.import_module("._triton_common", __name__)
    if not common.INTERPRETED:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "fused SOAP kernels need a CUDA device: there is none, and Triton's CPU interpreter is off "
                "(TRITON_INTERPRET=1 before triton is imported turns it on; slow, meant for tests). "
                "Use get_ops(fused=False) for the PyTorch path."
            )
    ops = {name: getattr(importlib.import_module("." + module, __name__), name) for name, module in _OP_MODULES.items()}
    return types.SimpleNamespace(**ops)
