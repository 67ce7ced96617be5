"""The writes of a step, held back until every param group's math has run.

"A step happens whole or not at all" without a backup copy: an optimizer's math computes every new value
into tensors of its own (this is where anything can fail: an allocation, a LAPACK call, a kernel launch)
and hands the base a :class:`PendingWrites`; once every group's math has run, the base applies them all.
Applying allocates nothing and so cannot fail part way: one ``torch._foreach_copy_`` of new values into
the parameters and state, the rows of a bucket's pools taken by ``index_copy_`` (see
:mod:`soap_optim.buckets`), then in-place updates into existing storage (a factor EMA in its product's
epilogue, the step counters).

A basis refresh comes last, one unit (a bucket, or one parameter) at a time, each computing everything
first and writing last. It is upkeep of the preconditioner, not part of the update: a unit that fails
(out of memory, a decomposition that fails) keeps the bases and moments it would have replaced, with a
warning, and the step stays taken. Holding every unit's refreshed bases until the end instead would cost
the memory of the factors and bases once more: the backup copy this module replaces.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Tuple

import torch


class PendingWrites:
    """New values and in-place updates waiting to be applied, in this order: copies, updates, refreshes.

    ``relaid``: the math moved state entries into new storage (see :mod:`soap_optim.buckets`), which may
    leave rows nobody uses in the buffers they left; the optimizer base then releases them, leaving the
    new pools in ``apart`` as they are."""

    def __init__(self) -> None:
        self._targets: List[torch.Tensor] = []
        self._values: List[torch.Tensor] = []
        self._rows: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.relaid = False
        self.apart: List[torch.Tensor] = []
        self._updates: List[Callable[[], None]] = []
        self._refreshes: List[Callable[[], None]] = []

    def copy(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target.copy_(value)`` when applied (``value`` must not be written before then)."""
        self._targets.append(target)
        self._values.append(value)

    def copy_rows(self, target: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
        """``target.index_copy_(0, index, value)`` when applied, with the copies."""
        self._rows.append((target, index, value))

    def update(self, apply: Callable[[], None]) -> None:
        """An in-place operation that allocates nothing, run after the copies."""
        self._updates.append(apply)

    def refresh(self, apply: Callable[[], None]) -> None:
        """A refresh unit that computes everything before it writes anything, run after the updates; one
        that raises leaves what it would have replaced as it was (see the module's docstring)."""
        self._refreshes.append(apply)

    def apply(self) -> None:
        """Apply everything, once; the new values are let go before the refreshes run."""
        if self._targets:
            torch._foreach_copy_(self._targets, self._values)
        for target, index, value in self._rows:
            target.index_copy_(0, index, value)
        for update in self._updates:
            update()
        refreshes = self._refreshes
        self._targets, self._values, self._rows, self._updates, self._refreshes = [], [], [], [], []
        for refresh in refreshes:
            try:
                refresh()
            except (RuntimeError, MemoryError) as error:  # out of memory, LinAlgError
                warnings.warn(
                    f"soap_optim: a basis refresh failed ({type(error).__name__}: {error}); its bases and moments "
                    f"were kept as they were and the step was taken",
                    RuntimeWarning,
                    stacklevel=2,
                )
