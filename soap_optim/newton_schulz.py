"""The SOAP-basis + Newton-Schulz update (``SOAP(newton_schulz=True)``): pure functions on [B, m, n] stacks.

SOAP's Adam ratio in the eigenbasis, with Nesterov's look-ahead on the first moment,

.. math::
    D = \\frac{(1+\\beta_1) m_t - \\beta_1 m_{t-1}}{\\sqrt{v_t} + \\epsilon}
      = \\frac{\\beta_1 m_t + (1-\\beta_1)\\tilde G}{\\sqrt{v_t} + \\epsilon},

is replaced by the orthogonal factor of its polar decomposition, :math:`D = U \\Sigma V^\\top \\mapsto U V^\\top`,
approximated as Muon does by five quintic Newton-Schulz iterations from :math:`X_0 = D / \\lVert D \\rVert_F`,

.. math::
    A = X X^\\top, \\qquad X \\leftarrow a X + (b A + c A^2) X, \\qquad (a, b, c) = (3.4445, -4.7750, 2.0315),

(on the wide orientation; a tall D is transposed around it), and scaled to AdamW's update RMS with
Muon's ``match_rms_adamw`` factor :math:`0.2 \\sqrt{\\max(m, n)}`. The polar factor commutes with the rotation
(:math:`\\mathrm{polar}(Q_L D Q_R^\\top) = Q_L\\, \\mathrm{polar}(D)\\, Q_R^\\top`), so orthogonalizing in the
eigenbasis and rotating back is Muon's orthogonalization of SOAP's direction: Muon's update where SOAP's
second moment has reweighted the eigen-directions first. The Nesterov numerator is written through the two
first moments (both in the current basis: a refresh carries :math:`m` to the new basis), so the batched
path, whose fused op does not return :math:`\\tilde G`, computes it from what it has.

The products run at IEEE float32 (or the state's float64), whatever the user's matmul settings (see
``soap_optim.precision``). The result is finite for every finite input: X_0 has norm at most 1, where the
quintic maps [0, 1.21] into itself (its largest value there is 1.2025, at 0.5545); a zero D stays zero.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .precision import full_float32_matmul

#: Muon's quintic coefficients and iteration count (torch.optim.Muon's defaults).
COEFFICIENTS: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
ITERATIONS = 5
#: The Frobenius norm below which D is treated as zero (torch.optim.Muon's eps).
NORM_FLOOR = 1e-7


def nesterov_ratio(
    exp_avg: torch.Tensor, previous_exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, eps: float
) -> torch.Tensor:
    """Half of ((1 + beta1) m_t - beta1 m_{t-1}) / (sqrt(v_t) + eps), elementwise (a new tensor).

    Halved because only its direction matters (:func:`orthogonalize` normalizes it): each halved term is
    below the dtype's max and so is their difference, half of beta1 m_t + (1 - beta1) G~, where
    (1 + beta1) m_t alone could overflow."""
    numerator = exp_avg.mul((1 + beta1) / 2).sub_(previous_exp_avg, alpha=beta1 / 2)
    return numerator.div_(exp_avg_sq.sqrt().add_(eps))


@full_float32_matmul()
def orthogonalize(direction: torch.Tensor) -> torch.Tensor:
    """The approximate polar factor of each matrix of a [B, m, n] stack (a new tensor, same dtype)."""
    tall = direction.shape[-2] > direction.shape[-1]
    x = direction.mT if tall else direction
    norms = torch.linalg.matrix_norm(x, keepdim=True).clamp_min_(NORM_FLOOR)
    x = x / norms
    a, b, c = COEFFICIENTS
    for _ in range(ITERATIONS):
        gram = torch.bmm(x, x.mT)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a X + (b A + c A^2) X
    return (x.mT if tall else x).contiguous()


def rms_scale(shape: Tuple[int, ...]) -> float:
    """Muon's ``match_rms_adamw`` factor 0.2 sqrt(max(m, n)): an orthogonal m x n matrix has RMS
    1/sqrt(max(m, n)), AdamW's update about 0.2."""
    return 0.2 * math.sqrt(max(shape[-2:]))


def multiply_adds(shape: Tuple[int, ...]) -> float:
    """Multiply-adds of :func:`orthogonalize` for one m x n matrix: per iteration X X^T (s^2 l), A^2 (s^3)
    and the product with X (s^2 l), s = min(m, n), l = max(m, n)."""
    small, large = sorted(shape[-2:])
    return ITERATIONS * (2 * small * small * large + small**3)
