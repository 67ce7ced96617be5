"""The base every soap_optim optimizer shares.

It owns what is the same for the whole family, so that each optimizer file holds only its math:

* ``step(closure)``, whole or not at all. Before anything is modified: every group's hyperparameters
  are validated again (a scheduler or the user may have changed them since the last step), the state
  layout is checked against the options it was built with, and every gradient is checked (sparse,
  complex, wrong shape, then non-finite) as the math will see it: in the state's dtype, after
  ``orthograd`` (see :mod:`soap_optim.gradient_check`). Only then are the groups stepped.
* Distribution: a :class:`soap_optim.distributed.Distribution` says which parameters this rank steps
  and with which tensors (the parameter, its local shard, or a gathered full copy), sums the gradient
  check over ranks, and brings the new values to every rank. On one process it hands every parameter
  through unchanged; the math never knows how many ranks there are.
* Argument validation per param group (also for ``add_param_group`` and ``load_state_dict``), rolled
  back on error; real-valued hyperparameters may be numbers or 0-d tensors, read as floats each step.
* ``load_state_dict`` with torch.optim's conventions (pre- and post-hooks, missing hyperparameters
  filled from the defaults, plain-number ``step``), plus shape and hyperparameter checks before
  anything is loaded, and optimizer state kept in its own precision (float32, float64 for float64
  parameters) instead of being cast to the parameter's dtype as torch.optim would for bf16/fp16.

Subclasses implement ``_validate_group``, ``_step_group(hyper, slots)`` and ``_expected_state_shapes``,
and may refine ``_is_elementwise``, ``_cost`` and ``_max_grad_norm``.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from copy import deepcopy
from functools import partial
from itertools import chain
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import gradient_check
from .buckets import release_unused_rows
from .dispatch import fused_problem
from .eigenbasis.bases import FallbackCounts, counting_fallbacks, report_fallbacks
from .distributed import Distribution, make_distribution
from .distributed import checkpoint as distributed_checkpoint
from .state_tree import map_tensors
from .gradient_check import describe
from .pending_writes import PendingWrites
from .precision import full_float32_matmul
from .validation import as_number, check_bool, check_choice


STATE_DTYPES = (None, torch.float32, torch.float64)

# float8 and other exotic floating dtypes have no arithmetic the optimizers can run
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(param: torch.Tensor, group: Optional[Dict[str, Any]] = None) -> torch.dtype:
    """dtype of optimizer state for ``param``: the group's ``state_dtype`` if set, else float64 for
    float64 parameters and float32 for every other dtype (bf16/fp16 parameters get float32 state)."""
    chosen = None if group is None else group.get("state_dtype")
    if chosen is not None:
        return chosen
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class Screen(NamedTuple):
    """What the gradient check (and the step, before the math) learned that the math may use this step
    (passed down explicitly: under ``torch.compile`` an attribute written across a graph break is not
    reliably seen later)."""

    # the largest gradient Frobenius norm (over ranks), or a bound of it far below every threshold it is
    # compared with (see SoapOptimizerBase._gradients_below_every_threshold)
    largest_norm: float
    grams_may_overflow: bool  # some gradient is large enough for its Gram matrices to overflow float32
    # skip_nonfinite_grads="on_device": whether the gradients pass the check, a 0-d bool on the device
    passed: Optional[torch.Tensor] = None
    # some two stepped parameters share a storage (so one must be stepped from the other's result); the
    # step sets it once for all groups, True (look for them) where not known
    storage_shared: bool = True


class Slot(NamedTuple):
    """One parameter as the math sees it for one step."""

    param: torch.Tensor  # updated in place: the parameter, its local shard, or a full copy of it
    grad: torch.Tensor  # the effective gradient (state dtype, orthograd, maximize applied); never written
    state: Dict[str, Any]  # this parameter's optimizer state, created lazily by the math
    shape: torch.Size  # the parameter's (global) shape, which plans are made from


def _cast_state(value: Any, *, device, dtype) -> Any:
    """Copy ``value`` (a tensor, or a list/tuple/dict of them) with floating tensors in ``dtype``."""
    return map_tensors(
        value,
        lambda t: t.to(device=device, dtype=dtype, copy=True) if t.is_floating_point() else t.to(device=device, copy=True),
    )


def _shape_mismatch(value: Any, expected: Any) -> Optional[str]:
    """None if ``value`` has the ``expected`` structure of shapes, else a description."""
    if isinstance(expected, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(expected):
            return f"expected a list of {len(expected)} entries, got {type(value).__name__}"
        for index, (v, e) in enumerate(zip(value, expected)):
            problem = _shape_mismatch(v, e)
            if problem is not None:
                return f"entry {index}: {problem}"
        return None
    if expected is None:
        return None if value is None else f"expected None, got a tensor of shape {tuple(value.shape)}"
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor of shape {tuple(expected)}, got {type(value).__name__}"
    if tuple(value.shape) != tuple(expected):
        return f"expected shape {tuple(expected)}, got {tuple(value.shape)}"
    return None


# Step counters are float64: exact for every count below 2^53. A float32 counter stops at 2^24 = 16,777,216
# (16777216 + 1 rounds back to 16777216), after which every refresh schedule (t % f) would freeze.
STEP_DTYPE = torch.float64


def new_step_count() -> torch.Tensor:
    """A fresh ``step`` counter: a 0-d CPU tensor (torch.optim's form) in :data:`STEP_DTYPE`."""
    return torch.tensor(0.0, dtype=STEP_DTYPE)


def advance_step_counts(counters: List[torch.Tensor]) -> Callable[[], None]:
    """``counter += 1`` for every counter, one foreach call, returned to run now or later (running it
    allocates nothing). Host counters get the 1 as one 0-d tensor made here: on the CPU foreach loops over
    the tensors and would wrap a Python 1 into a new tensor for each (torch.optim's Adam does the same)."""
    if counters and counters[0].is_cpu and not torch.compiler.is_compiling():
        return partial(torch._foreach_add_, counters, torch.tensor(1.0, dtype=counters[0].dtype), alpha=1.0)
    return partial(torch._foreach_add_, counters, 1)


def _step_count(value: Any) -> torch.Tensor:
    """A loaded ``step``: a 0-d :data:`STEP_DTYPE` tensor whatever it was saved as (a tensor of one element,
    an int or a float), after the same checks for every form: a finite whole number >= 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"loaded state has an invalid step count: a tensor of shape {tuple(value.shape)} and dtype "
                f"{value.dtype} (must hold one real number >= 0)"
            )
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"loaded state has an invalid step count {value!r} (must be a number >= 0)")
    else:
        number = value
    if not (math.isfinite(number) and number >= 0 and float(number) == math.floor(number)):
        raise ValueError(f"loaded state has an invalid step count {number!r} (must be a whole number >= 0)")
    return torch.tensor(float(number), dtype=STEP_DTYPE)


def _copy_all(states: List[Dict[str, Any]], tensors: List[torch.Tensor]) -> Tuple[List[Dict[str, Any]], List[torch.Tensor]]:
    """Copies of many states (dicts whose values are tensors or lists of tensors and None; anything else is
    deep-copied) and of tensors, the tensor copies batched into one ``torch._foreach_copy_`` (loops, not a
    recursion: this runs every step)."""
    sources = list(tensors)
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                sources.append(value)
            elif isinstance(value, list):
                sources.extend(t for t in value if isinstance(t, torch.Tensor))
    copies = [torch.empty_like(t) for t in sources]
    if sources:
        torch._foreach_copy_(copies, sources)
    remaining = iter(copies[len(tensors) :])
    copied_states = []
    for state in states:
        copied = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                copied[key] = next(remaining)
            elif isinstance(value, list):
                copied[key] = [next(remaining) if isinstance(t, torch.Tensor) else t for t in value]
            else:
                copied[key] = deepcopy(value)
        copied_states.append(copied)
    return copied_states, copies[: len(tensors)]


class _Rollback:
    """What undoes a step whose math raised (out of memory included): "whole or not at all" also then.

    Taken after every check passed, before the math runs. The states the step creates are noted (they are
    empty now): undoing empties them again, so that a half-built first state (SOAP's factors without
    bases: its first step is its memory peak) is never stepped on. For a group whose math may fail after
    it began modifying tensors, the parameters about to be stepped and their state are copied, and undoing
    puts the values back; the copy lives for the duration of the step (transient memory: those
    parameters and their state once more). A group whose math allocates everything before it modifies
    anything (``_math_allocates_first``: Adam's PyTorch paths; SOAP's, which hold their writes back until
    every group's math has run) needs no copy.
    """

    def __init__(self, work: Sequence[Tuple[Dict[str, Any], List["Slot"]]], copies: Sequence[bool]) -> None:
        self._fresh = [slot.state for _, slots in work for slot in slots if not slot.state]
        slots = [slot for (_, group_slots), copy in zip(work, copies) if copy for slot in group_slots]
        states = [slot.state for slot in slots if slot.state]
        params = [slot.param for slot in slots]
        copied_states, copied_params = _copy_all(states, params)
        self._states = list(zip(states, copied_states))
        self._params = list(zip(params, copied_params))

    def undo(self) -> None:
        for state in self._fresh:
            state.clear()
        for state, saved in self._states:
            state.clear()
            state.update(saved)
        for param, saved in reversed(self._params):  # reversed: of two slots on one storage, the first copy wins
            param.copy_(saved)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation on ``device`` can still get, or None where unknown: for a CUDA device the
    driver's free memory plus what torch's caching allocator holds unused; for the CPU (Linux) the
    kernel's MemAvailable (free memory plus reclaimable caches)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _numel_of(shapes: Any) -> int:
    """Entries in an ``_expected_state_shapes`` value: a shape, None, or a list of them."""
    if shapes is None:
        return 0
    if isinstance(shapes, list):
        return sum(_numel_of(s) for s in shapes)
    return math.prod(shapes)


# ||G||_F above this (float32) may overflow a Gram matrix entry or its EMA (see without_overflowing_grams)
_GRAM_SAFE_SQUARED_NORM = torch.finfo(torch.float32).max / 4


class SoapOptimizerBase(torch.optim.Optimizer):
    """Shared machinery; not an optimizer by itself."""

    # group options the state's layout depends on: changing one after state exists is an error
    _layout_keys: Tuple[str, ...] = ("state_dtype",)

    # state keys a loaded entry may lack (older checkpoints); checked like the others when present
    _optional_state_keys: Tuple[str, ...] = ()

    # the last step's Screen.grams_may_overflow, for inspection (the math gets the Screen itself)
    _gradients_may_overflow = True

    def __init__(self, params, defaults: Dict[str, Any], *, process_group=None, shard_over_replicas: bool = False) -> None:
        defaults = {**defaults}
        defaults.setdefault("skip_nonfinite_grads", False)
        # Undo a step whose math raised (out of memory included). Costs a transient copy of the stepped
        # parameters and their state during each step where the math may fail after it began writing (the
        # state's own size; SOAP's PyTorch paths hold their writes back instead and need none); a param
        # group may set it False to save that memory.
        defaults.setdefault("rollback_on_error", True)
        check_bool("shard_over_replicas", shard_over_replicas)
        self._distribution: Distribution = make_distribution(process_group, shard_over_replicas)
        self._warned_skip = False
        self._layouts: Dict[torch.Tensor, Tuple[str, ...]] = {}  # per parameter with state: _layout_key
        self._limits: Dict[Tuple, float] = {}  # _max_grad_norm by (shape, state dtype, layout options)
        # the eigenbasis core's device-side fallbacks, read with the next step's gradient norms (see bases.py)
        self._basis_fallbacks = FallbackCounts()
        self._unused_rows_possible = False  # see _release_unused_rows
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.optim's convention: options a saved group lacks take this optimizer's defaults
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._own_defaults().items():
                group.setdefault(key, value)
            group.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_distribution", make_distribution(None))
        self.__dict__.setdefault("_warned_skip", False)
        if "_layouts" not in state:  # a copy made before the records travelled with it: rebuild them
            self._layouts = self._current_layouts()
        self.__dict__.setdefault("_limits", {})
        self.__dict__.setdefault("_basis_fallbacks", FallbackCounts())
        # a copy or a load: entries may share a storage without being views of it (see _release_unused_rows)
        self._unused_rows_possible = True

    def __getstate__(self) -> Dict[str, Any]:
        # the layout records travel with the state they describe (deepcopy, pickle, torch.save of the
        # optimizer), so that a copy refuses a layout change exactly as the original does
        return {**super().__getstate__(), "_layouts": self._layouts}

    def _current_layouts(self) -> Dict[torch.Tensor, Tuple[str, ...]]:
        """Layout records for the state as it is, under the groups' current options."""
        layouts = {}
        for group in self.param_groups:
            hyper = {key: as_number(value) for key, value in group.items() if key != "params"}
            for param in group["params"]:
                if self.state.get(param):
                    layouts[param] = self._layout_key(hyper, param)
        return layouts

    def _prune_layouts(self) -> None:
        """Keep only the records of parameters that are in a param group and have state: the records
        follow ``self.state`` and ``param_groups`` (``state.pop(p)``, ``opt.state = defaultdict(dict)``,
        a parameter removed from its group), so that a state rebuilt from nothing may take a new layout and
        a removed parameter (and its ``.grad``) is not kept alive by them."""
        if not self._layouts:
            return
        live = {id(param) for group in self.param_groups for param in group["params"]}
        self._layouts = {
            param: key for param, key in self._layouts.items() if id(param) in live and self.state.get(param)
        }

    def _own_defaults(self) -> Dict[str, Any]:
        """This optimizer's defaults, without the keys torch.optim adds for itself (``differentiable``)."""
        return {key: value for key, value in self.defaults.items() if key != "differentiable"}

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("skipped_steps", 0)
        try:
            for param in group["params"]:
                if param.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"(got one of shape {tuple(param.shape)}); use torch.view_as_real"
                    )
                if param.dtype not in PARAM_DTYPES:
                    raise ValueError(
                        f"{type(self).__name__} needs floating-point parameters (float16, bfloat16, float32 or float64), "
                        f"got {param.dtype}"
                    )
            hyper = self._check_group(group)
            self._check_can_step(hyper, group["params"])
            self._distribution.record_group(self, group["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        self._distribution.invalidate()

    def _check_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """Validate a group's hyperparameters (ValueError, nothing changed); return them read as numbers."""
        hyper = {key: as_number(value) for key, value in group.items() if key != "params"}
        check_bool("maximize", hyper["maximize"])
        check_bool("orthograd", hyper["orthograd"])
        if hyper["skip_nonfinite_grads"] != "on_device":
            check_bool("skip_nonfinite_grads", hyper["skip_nonfinite_grads"])
        check_bool("rollback_on_error", hyper["rollback_on_error"])
        check_choice("state_dtype", hyper["state_dtype"], STATE_DTYPES)
        self._validate_group(hyper)
        return hyper

    def _validate_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- what subclasses may refine
    def _is_elementwise(self, shape: torch.Size, hyper: Dict[str, Any]) -> bool:
        """Whether a parameter's update is elementwise (each entry depends only on the same entry of its
        gradient and state, and its state is parameter-shaped), so that it can be stepped shard by shard."""
        return False

    def _needs_shapes(self) -> bool:
        """Whether the math depends on each parameter's shape (preconditioners, factored moments), so that
        flattened parameters (FSDP1, DeepSpeed ZeRO) would silently change the optimizer."""
        return not self._is_elementwise(torch.Size((2, 2)), {**self._own_defaults(), "params": []})

    def _role_key(self, hyper: Dict[str, Any]) -> Tuple:
        """The options that decide which parameters are stepped piece by piece and what each costs."""
        keys = self._layout_keys + ("orthograd", "normalize_grads", "precondition_frequency")
        return tuple(repr(hyper.get(key)) for key in keys)

    def _cost(self, shape: torch.Size, hyper: Dict[str, Any]) -> float:
        """Relative cost of one parameter's step (flops, amortized over refreshes), for ownership."""
        return float(math.prod(shape))

    def _max_grad_norm(self, shape: torch.Size, hyper: Dict[str, Any], dtype: torch.dtype) -> float:
        """The largest gradient Frobenius norm the math can take in ``dtype`` without overflowing; a larger
        one raises ``FloatingPointError`` (or skips the step under ``skip_nonfinite_grads``), nothing modified.

        Default: sqrt(max) / 2 (9.2e18 in float32), for a second moment v = EMA(g^2) of the gradient's (or
        rotated gradient's) entries, each at most ||G||_F. Above sqrt(max), g^2 overflows: v would be capped
        at the dtype's max (or be inf), m / sqrt(v) would no longer be about 1, and a constant gradient of
        1e25 would move a parameter by 1e2 in 5 steps at lr 1e-3. The factor 2 leaves room for the rounding
        of a rotation. Optimizers whose step is bounded whatever the gradient return inf."""
        return math.sqrt(torch.finfo(dtype).max) / 2

    # ----------------------------------------------------------------- step
    def _layout_options(self, hyper: Dict[str, Any]) -> Tuple[str, ...]:
        return tuple(f"{key}={hyper.get(key)!r}" for key in self._layout_keys)

    def _layout_key(self, hyper: Dict[str, Any], param: torch.Tensor, options=None) -> Tuple[str, ...]:
        """What a parameter's state layout was built from: the layout options, its dtype and shape (one
        tuple object per distinct key, so that comparing a record with the current key is usually an
        identity check)."""
        options = self._layout_options(hyper) if options is None else options
        memo = self.__dict__.setdefault("_layout_key_memo", {})
        found = memo.get((options, param.dtype, param.shape))
        if found is None:
            found = options + (f"parameter dtype={param.dtype}", f"shape={tuple(param.shape)}")
            memo[(options, param.dtype, param.shape)] = found
        return found

    def _check_layout(self, options: Tuple[str, ...], param: torch.Tensor, where) -> None:
        """ValueError if the state of ``param`` was built under other layout ``options`` or another dtype
        (``where``: a callable describing the parameter, called only on error)."""
        built = self._layouts.get(param)
        current = self._layout_key({}, param, options)
        if built is not None and built is not current and built != current:
            if not self.state.get(param):  # the state was emptied since: a new one may take any layout
                del self._layouts[param]
                return
            where = where()
            changed = [(old, new) for old, new in zip(built, current) if old != new]
            raise ValueError(
                f"{type(self).__name__}: the state of {where} was built with {', '.join(o for o, _ in changed)}, "
                f"but it now has {', '.join(n for _, n in changed)}. These decide the state's layout and cannot "
                f"change once the state exists: build a new optimizer for the new setting (nothing was modified)"
            )

    def _membership(self) -> Tuple:
        """What the per-parameter bookkeeping of a step depends on besides gradients and options: the state
        dict's identity and size, and each group's parameters (identity, dtype, shape). While it stays the
        same, the layout records need no pruning and the gradient limits computed before still hold."""
        return (
            id(self.state), len(self.state),
            tuple((id(p), p.dtype, p.shape) for group in self.param_groups for p in group["params"]),
        )

    def _prepare_step(self) -> Optional[Tuple[Screen, List[Tuple[Dict[str, Any], List[Slot]]]]]:
        """Everything that can fail, before anything is modified: the groups to step and their slots,
        or None when the step is skipped (non-finite gradients under ``skip_nonfinite_grads``).

        Per-parameter work is kept to what the gradients need (structure, dtype, the layout record's
        identity check); what depends only on the groups' membership is recomputed when it changes."""
        name = type(self).__name__
        membership = self._membership()
        changed = membership != self.__dict__.get("_last_membership")
        if changed:
            self._prune_layouts()
            self._unused_rows_possible = True  # state may have been dropped (pop, reset, surgery, a load)
            self._limits_by_index = None
            self._last_membership = membership
        hypers = [self._check_group(group) for group in self.param_groups]
        for group_index, (hyper, group) in enumerate(zip(hypers, self.param_groups)):
            with_grads = [p for p in group["params"] if p.grad is not None]
            self._check_can_step(hyper, with_grads)
            for param in with_grads:
                grad = param.grad
                if grad.layout is not torch.strided or grad.is_complex() or grad.shape != param.shape:
                    param_index = next(i for i, p in enumerate(group["params"]) if p is param)
                    gradient_check.check_structure(
                        name, lambda g=group_index, i=param_index, p=param: describe(g, i, p.shape), param, grad
                    )
        work = self._distribution.gather(self, self.param_groups, hypers)
        grads_per_group: List[List[torch.Tensor]] = []
        states_per_group: List[List[Dict[str, Any]]] = []
        grads, indices, fresh = [], [], []
        layouts = self._layouts
        # the layout records were all checked against these options last time, and none changed since
        layout_check = (membership, tuple(self._layout_options(h) for h in hypers), id(layouts), len(layouts))
        if layout_check == self.__dict__.get("_layouts_checked"):
            layouts = {}
        state_get = self.state.get
        for group_index, (hyper, items) in enumerate(zip(hypers, work)):
            states = [state_get(item.param) for item in items]
            fresh += [(group_index, item) for item, state in zip(items, states) if not state]
            if layouts:
                options = self._layout_options(hyper)
                for item in items:
                    if item.param in layouts:
                        self._check_layout(
                            options, item.param,
                            lambda item=item, gi=group_index: describe(gi, item.param_index, item.param.shape),
                        )
            orthograd, maximize, chosen = hyper["orthograd"], hyper["maximize"], hyper["state_dtype"]
            if orthograd or maximize:
                effective = [
                    gradient_check.effective_gradient(
                        item.tensor, item.grad, state_dtype(item.param, hyper), orthograd=orthograd, maximize=maximize
                    )
                    for item in items
                ]
            else:  # the gradient in the state's dtype (what effective_gradient returns here), without a call each
                effective = [
                    grad if grad.dtype is dtype else grad.to(dtype)
                    for grad, dtype in (
                        (item.grad, chosen or state_dtype(item.param)) for item in items
                    )
                ]
            for item, grad in zip(items, effective):
                if item.counted and grad.numel():
                    grads.append(grad)
                    indices.append(item.global_index)
            grads_per_group.append(effective)
            states_per_group.append(states)
        self._layouts_checked = layout_check
        if fresh:
            self._check_new_state_fits(hypers, fresh)
        if hypers and all(hyper["skip_nonfinite_grads"] == "on_device" for hyper in hypers):
            screen = self._gradients_checked_on_device(grads, indices, hypers)
            if screen.passed is not None:  # a failed check steps with zeros, then puts everything back
                grads_per_group = [
                    [torch.where(screen.passed, grad, 0.0) for grad in effective] for effective in grads_per_group
                ]
        else:
            screen = self._gradients_are_fine(grads, indices, hypers)
        if screen is None:
            return None
        # whose layout the step records: after a membership change every parameter's, as it may have
        # gained state outside a step; otherwise only those of the states this step builds
        self._record_layouts = None if changed else [(item.param, hypers[gi]) for gi, item in fresh]
        make = tuple.__new__  # Slot(...) without the keyword handling of a NamedTuple's __new__ (one per parameter)
        return screen, [
            (hyper, [
                make(Slot, (item.tensor, grad, self.state[item.param] if state is None else state, item.param.shape))
                for item, grad, state in zip(items, effective, states)
            ])
            for hyper, items, effective, states in zip(hypers, work, grads_per_group, states_per_group)
        ]

    def _check_new_state_fits(self, hypers: Sequence[Dict[str, Any]], fresh: Sequence[Tuple[int, Any]]) -> None:
        """MemoryError, before anything is allocated, when the state this step would create cannot fit.

        SOAP's and Shampoo's first step allocates a d x d factor and basis per preconditioned axis: a
        (100000, 2) parameter with ``max_precond_dim=100000`` asks for 80 GB, which on the CPU may be
        granted lazily and end in the process being killed mid-step. The estimate is the state's own
        bytes (``_expected_state_shapes``), per device; one process only (a rank keeps only its share).
        ``fresh``: (group index, work item) of every parameter about to get its state."""
        if self._distribution.mode != "single":
            return
        need: Dict[torch.device, int] = defaultdict(int)
        largest: Dict[torch.device, Tuple[int, str]] = {}
        for group_index, item in fresh:
            param, hyper = item.param, hypers[group_index]
            dtype = state_dtype(param, hyper)
            size = _numel_of(list(self._expected_state_shapes(param, hyper).values())) * dtype.itemsize
            need[param.device] += size
            if size > largest.get(param.device, (0, ""))[0]:
                largest[param.device] = (size, describe(group_index, item.param_index, param.shape))
        for device, size in need.items():
            free = available_bytes(device) if size > 2**26 else None  # below 64 MB: not worth a look
            if free is not None and size > free:
                biggest, where = largest[device]
                raise MemoryError(
                    f"{type(self).__name__}: the optimizer state this step would create needs {size / 2**30:.1f} GiB "
                    f"on {device} ({biggest / 2**30:.1f} GiB for {where} alone), more than the {free / 2**30:.1f} GiB "
                    f"available. Lower max_precond_dim (axes longer than it get no d x d factor), or use "
                    f"one_sided=True / factorized=True (SOAP); nothing was modified"
                )

    def _limits_per_index(self, hypers) -> Tuple[List[float], float]:
        """``_max_grad_norm`` of every parameter (by global index) and the smallest of them; kept while the
        groups' membership (see ``_membership``) and layout options stay the same."""
        layouts = tuple(self._layout_options(hyper) for hyper in hypers)  # the limits depend on the plan
        cached = getattr(self, "_limits_by_index", None)
        if cached is not None and cached[0] == layouts:
            return cached[1], cached[2]
        limits = []
        for hyper, group, layout in zip(hypers, self.param_groups, layouts):
            for param in group["params"]:
                key = (tuple(param.shape), state_dtype(param, hyper), layout)
                limit = self._limits.get(key)
                if limit is None:
                    limit = self._limits[key] = self._max_grad_norm(param.shape, hyper, key[1])
                limits.append(limit)
        smallest = min(limits, default=math.inf)
        self._limits_by_index = (layouts, limits, smallest)
        return limits, smallest

    def _gradients_checked_on_device(self, grads, indices, hypers) -> Screen:
        """``skip_nonfinite_grads="on_device"``: the check of :meth:`_gradients_are_fine` decided on the
        device, with no host read. ``Screen.passed`` is a 0-d bool: every gradient finite and within its
        limit (``_max_grad_norm``). The step then runs on the gradients where passed, zeros elsewhere, and
        ``step`` puts parameters and state back where not passed (see :meth:`_keep_where_passed`); the
        count of such steps stays on the device until read (:meth:`read_device_counters`). A finite
        gradient whose float32 norm overflows counts as not passed (the host check would look closer).
        The overflow guards of the math stay on (they need the norms on the host to be skipped)."""
        if self._distribution.mode != "single":
            raise ValueError(
                f'{type(self).__name__}: skip_nonfinite_grads="on_device" runs on one process only (the '
                f"distributed check sums the norms over ranks on the host); use True or False"
            )
        if not grads:
            return Screen(math.inf, True)
        norms = gradient_check.squared_norms(grads).sqrt()
        limits, _ = self._limits_per_index(hypers)
        cached = getattr(self, "_device_limits", None)
        key = (tuple(indices), id(limits), norms.device)
        if cached is None or cached[0] != key:  # a host-to-device copy when the membership changes only
            cached = self._device_limits = (key, torch.tensor([limits[i] for i in indices], dtype=torch.float64).to(norms.device))
        passed = torch.isfinite(norms).all() & (norms <= cached[1]).all()
        skipped = self.__dict__.setdefault("_skipped_on_device", {})
        previous = skipped.get(norms.device)
        failed = (~passed).to(torch.float64)
        skipped[norms.device] = failed if previous is None else previous + failed
        return Screen(math.inf, True, passed)

    def _keep_where_passed(self, passed: torch.Tensor, saved) -> None:
        """After a step under ``skip_nonfinite_grads="on_device"``: every parameter and state tensor that
        existed before it (``saved``: pairs of the live container and its copy) takes its copy's value where
        the check failed, by ``torch.where`` (no host read). A state this step created stays (built from
        zero gradients), and the host ``step`` counters have advanced either way: a skipped step still
        counts for bias correction and refresh schedules."""
        live, copies = [], []
        for current, copy in saved:
            if isinstance(current, torch.Tensor):
                live.append(current)
                copies.append(copy)
                continue
            for key, value in copy.items():
                if key == "step" or key not in current:
                    continue
                now = current[key]
                pairs = zip(now, value) if isinstance(value, list) else [(now, value)]
                for tensor, old in pairs:
                    if isinstance(tensor, torch.Tensor) and isinstance(old, torch.Tensor):
                        live.append(tensor)
                        copies.append(old)
        for tensor, old in zip(live, copies):
            tensor.copy_(torch.where(passed, tensor, old))

    def read_device_counters(self) -> None:
        """Read what is counted on the device: warn about eigenbasis fallbacks (a non-finite factor or
        decomposition kept the previous or identity basis) and add the steps skipped on the device
        (``skip_nonfinite_grads="on_device"``) to each param group's ``skipped_steps``. A host read when
        anything was counted; every step reads the fallbacks with its gradient check anyway (not under
        "on_device"), and ``state_dict()`` calls this."""
        pending = self._basis_fallbacks.take(torch.device("cpu"))
        if pending is not None:
            report_fallbacks(pending.tolist())
        skipped = self.__dict__.get("_skipped_on_device")
        if skipped:
            count = int(sum(float(value) for value in skipped.values()))
            self._skipped_on_device = {}
            for group in self.param_groups:
                group["skipped_steps"] = group.get("skipped_steps", 0) + count

    def _check_can_step(self, hyper: Dict[str, Any], params: Sequence[torch.Tensor]) -> None:
        """What the group's options need from its tensors: ``fused=True`` needs the kernels to run."""
        if hyper.get("fused") is True and params:
            dtypes = {state_dtype(p, hyper) for p in params}
            for dtype in dtypes:
                problem = fused_problem(params, dtype)
                if problem is not None:
                    raise ValueError(f"{type(self).__name__}: fused=True cannot run here: {problem}; use fused=None or False")

    def _read_with_fallbacks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (a 1-D device tensor) on the host: the step's one host read, which also brings the
        eigenbasis fallbacks counted on the device since the last read and reports them."""
        fallbacks = self._basis_fallbacks.take(values.device)
        if fallbacks is None:
            return values.cpu()
        read = torch.cat([values, fallbacks]).cpu()
        report_fallbacks(read[len(values) :].tolist())
        return read[: len(values)]

    def _gradients_below_every_threshold(self, grads, hypers) -> Optional[Screen]:
        """The screen's shortcut on one process (host tensors): the Screen when the sum of the gradients'
        squared norms is finite and below a quarter of the square of every threshold the screen compares a
        norm with (each parameter's limit, the Gram overflow bound, which is also the second moment's),
        so that no gradient's norm can reach one; else None, and the screen looks at each gradient. Its
        ``largest_norm`` is then the bound (every comparison with it decides as the largest norm would)."""
        bound = gradient_check.squared_norm_bound(grads)
        if bound is None:
            return None
        values = self._read_with_fallbacks(bound.reshape(1)).tolist()
        _, smallest = self._limits_per_index(hypers)
        if not values[0] <= 0.25 * min(smallest * smallest, _GRAM_SAFE_SQUARED_NORM):
            return None
        self._gradients_may_overflow = False  # for inspection
        return Screen(math.sqrt(values[0]), False)

    def _gradients_are_fine(self, grads, indices, hypers) -> Optional[Screen]:
        """The screen over every gradient this rank holds, summed over ranks: its findings, None to skip
        the step, or FloatingPointError to refuse it; either way nothing is modified."""
        if self._distribution.mode == "single":
            screen = self._gradients_below_every_threshold(grads, hypers)
            if screen is not None:
                return screen
        count = self._distribution.num_params(self.param_groups)
        squares = torch.zeros(count, dtype=torch.float64)
        if grads:
            norms = self._read_with_fallbacks(gradient_check.squared_norms(grads))
            if len(indices) == count and indices == list(range(count)):  # one process, every gradient: in order
                squares = norms
            else:
                squares = squares.index_copy(0, torch.tensor(indices), norms)
        values = self._distribution.all_reduce_sum(squares).tolist()
        flagged = [index for index, value in enumerate(values) if not math.isfinite(value)]
        bad: Dict[int, bool] = {}
        if flagged:
            # rare: look at the flagged gradients entry by entry (and without overflow), again over ranks
            wanted = set(flagged)
            mine = [k for k, index in enumerate(indices) if index in wanted]
            is_bad, exact = gradient_check.confirm_nonfinite([grads[k] for k in mine])
            flags = torch.zeros(2, count, dtype=torch.float64)
            for k, b, e in zip(mine, is_bad, exact):
                flags[0, indices[k]] += float(b)
                if not b:
                    flags[1, indices[k]] += e
            flag_values, exact_values = self._distribution.all_reduce_sum(flags).tolist()
            for index in flagged:
                bad[index] = flag_values[index] > 0
                if not bad[index]:
                    values[index] = exact_values[index]
        largest_square = max((v for v in values if math.isfinite(v)), default=0.0)
        screen = Screen(math.sqrt(largest_square), largest_square > _GRAM_SAFE_SQUARED_NORM)
        self._gradients_may_overflow = screen.grams_may_overflow  # for inspection
        # per-parameter limits of the math (e.g. SOAP's rotation) depend on shapes and options alone, so
        # every rank judges every parameter from the summed norms, with no second collective
        too_large = [False] * count
        limits, smallest = self._limits_per_index(hypers)
        if math.sqrt(largest_square) > smallest:  # else no finite norm is near any limit
            for index, param in enumerate(p for group in self.param_groups for p in group["params"]):
                if param.grad is None or bad.get(index, False) or values[index] == 0.0:
                    continue
                too_large[index] = limits[index] < math.inf and math.sqrt(values[index]) > limits[index]
        problems = sorted({i for i, b in bad.items() if b} | {i for i, t in enumerate(too_large) if t})
        if not problems:
            return screen
        first = problems[0]
        group_index, param_index, param = self._distribution.locate(self.param_groups, first)
        where = describe(group_index, param_index, param.shape)
        if bad.get(first, False):
            reason = f"non-finite gradient (NaN or Inf, in the state's dtype) for {where}"
        else:
            dtype = state_dtype(param, hypers[group_index])
            reason = (
                f"gradient too large for {where}: its norm {math.sqrt(values[first]):.3e} is above "
                f"{self._max_grad_norm(param.shape, hypers[group_index], dtype):.3e}, the largest "
                f"{type(self).__name__} can step in {dtype} without overflow"
            )
        skip = all(
            hypers[self._distribution.locate(self.param_groups, i)[0]]["skip_nonfinite_grads"] for i in problems
        )
        if not skip:
            raise FloatingPointError(f"{reason}; the step was not taken and parameters and optimizer state are unchanged")
        for group in self.param_groups:
            group["skipped_steps"] = group.get("skipped_steps", 0) + 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"{type(self).__name__}: {reason}; skipping the step (skip_nonfinite_grads=True; skipped steps "
                f"are counted in each param group's 'skipped_steps'; warned once)",
                RuntimeWarning,
                stacklevel=4,
            )
        return None

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = self._prepare_step()
        if prepared is None:
            return loss
        screen, work = prepared
        stepped = [slot.param for _, slots in work for slot in slots]
        # of two parameters on one storage, the second must be stepped from the first one's result: each
        # group's writes are then applied right after its math, and the backup copy undoes a failure
        shared = len({param.untyped_storage().data_ptr() for param in stepped}) < len(stepped)
        screen = screen._replace(storage_shared=shared)  # the math need not look again
        # a group that writes in place needs its copy unless no other group's math runs after it: a later
        # group's failure would otherwise leave its writes behind (held writes are applied after all the math)
        last = max((i for i, (_, slots) in enumerate(work) if slots), default=-1)
        saved = None
        if screen.passed is not None:  # skip_nonfinite_grads="on_device": copies to put back if the check failed
            slots = [slot for _, group_slots in work for slot in group_slots]
            states = [slot.state for slot in slots if slot.state]
            state_copies, param_copies = _copy_all(states, [slot.param for slot in slots])
            saved = list(zip([slot.param for slot in slots], param_copies)) + list(zip(states, state_copies))
        rollback = _Rollback(work, [
            hyper["rollback_on_error"] and (
                shared or not self._math_allocates_first(hyper, slots)
                or (i < last and not self._holds_writes(hyper, slots))
            )
            for i, (hyper, slots) in enumerate(work)
        ])
        held = []
        relaid, apart = False, []  # whether some group's math moved state entries to new storage; pools kept apart
        fallbacks = FallbackCounts()
        try:
            # the preconditioner's products ignore the user's TF32/bf16 settings
            with full_float32_matmul(), counting_fallbacks(fallbacks):
                for hyper, slots in work:
                    if slots:
                        writes = self._step_group(hyper, slots, screen)
                        if writes is not None:
                            relaid |= writes.relaid
                            apart += writes.apart
                            held.append(writes)
                            if shared:
                                held.pop().apply()
                for writes in held:  # every group's math ran: the writes it held back cannot fail
                    writes.apply()
        except BaseException:
            rollback.undo()
            self._unused_rows_possible = True  # the undone states hold copies: their pool rows are unused
            raise
        del rollback
        self._basis_fallbacks.merge(fallbacks)
        if saved is not None:
            self._keep_where_passed(screen.passed, saved)
        if relaid or self._unused_rows_possible:
            self._release_unused_rows(apart)
        self._distribution.scatter(self)
        record = self._record_layouts
        if record is None:
            record = [(param, hyper) for (hyper, _), group in zip(work, self.param_groups) for param in group["params"]]
        for param, hyper in record:
            if param not in self._layouts and self.state.get(param):
                self._layouts[param] = self._layout_key(hyper, param)
        return loss

    def _step_group(self, hyper: Dict[str, Any], slots: List[Slot], screen: Screen) -> Optional[PendingWrites]:
        """Step one group: write in place and return None, or write nothing and return the writes, which
        the base applies once every group's math has run (see :mod:`soap_optim.pending_writes`)."""
        raise NotImplementedError

    def _math_allocates_first(self, hyper: Dict[str, Any], slots: List[Slot]) -> bool:
        """Whether ``_step_group`` allocates every temporary before it modifies any tensor (it returns its
        writes held back, or writes after its last allocation), so that an exception (out of memory) can
        only come before anything changed and the step needs no backup copy to undo itself (see
        ``_Rollback``). Default: not known, so the step keeps a transient copy."""
        return False

    def _holds_writes(self, hyper: Dict[str, Any], slots: List[Slot]) -> bool:
        """Whether ``_step_group`` returns its writes held back (applied once every group's math ran)
        rather than writing in place. Default: it writes in place."""
        return False

    def _release_unused_rows(self, apart: Sequence[torch.Tensor] = ()) -> None:
        """Re-stack the state entries on a storage that has rows nobody uses (see
        :func:`soap_optim.buckets.release_unused_rows`), so that the state holds no memory beyond its own
        bytes (nor does a saved state dict). Needed only where entries may have left a bucket's pool: the
        math stacked entries into a new pool (a new member, a loaded state), state was dropped (``state.pop``,
        a reset, a parameter removed from its group), a failed step was undone, or the state arrived
        through a copy or a load; a step whose members all keep their rows (whichever of them has a
        gradient) runs none of it. ``apart``: new pools of members that keep taking part without the others
        (frozen layers), left as they are. Values are unchanged; if the new storage cannot be allocated, the
        layout stays and is tidied after a later step."""
        in_groups = {id(param) for group in self.param_groups for param in group["params"]}
        groups = [[self.state[p] for p in group["params"] if self.state.get(p)] for group in self.param_groups]
        groups.append([
            state for param, state in self.state.items() if id(param) not in in_groups and isinstance(state, dict)
        ])
        try:
            release_unused_rows(groups, apart)
        except (RuntimeError, MemoryError):  # out of memory: values are unchanged either way
            self._unused_rows_possible = True
            return
        self._unused_rows_possible = False

    # ----------------------------------------------------------------- state_dict
    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        """For each state key: the expected shape, or a list of shapes / None for list entries."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state dict. On several ranks (see :mod:`soap_optim.distributed.checkpoint`): the
        complete state as DTensors when ``torch.distributed.checkpoint``'s state-dict API asks (every rank
        calls it); under FSDP2 otherwise this rank's marked share; under DDP with ``process_group=`` the
        result of this rank's last ``consolidate_state_dict``, and a RuntimeError without one."""
        self.read_device_counters()
        state_dict = super().state_dict()
        distribution = self._distribution
        distribution.plan(self, self.param_groups, [self._check_group(g) for g in self.param_groups])
        if distribution.mode == "single":
            return state_dict
        if distributed_checkpoint.called_by_torch_checkpoint():
            return distributed_checkpoint.complete_state(distribution, self, state_dict)
        if distribution.mode == "replicated":
            if distribution.consolidated is not None:
                return distribution.consolidated
            raise RuntimeError(
                f"{type(self).__name__} with process_group= keeps each parameter's state on one rank, so this "
                f"rank's state_dict() alone would miss the others'. Call consolidate_state_dict(to=0) on every "
                f"rank first, then state_dict() on rank 0 (as with ZeroRedundancyOptimizer), or save through "
                f"torch.distributed.checkpoint (get_state_dict), which every rank calls"
            )
        return distributed_checkpoint.share(distribution, self, state_dict)

    def _state_device(self, param: torch.Tensor) -> torch.device:
        return param.to_local().device if hasattr(param, "to_local") else param.device

    def consolidate_state_dict(self, to: int = 0) -> Optional[Dict[str, Any]]:
        """The whole optimizer's state dict in single-process form, on rank ``to`` (None on the others).

        A collective under DDP (``process_group=``) or FSDP2: every rank must call it. The result loads
        into a single-process optimizer, or into a sharded one at any world size. On one process it is
        ``state_dict()``.
        """
        distribution = self._distribution
        distribution.plan(self, self.param_groups, [self._check_group(g) for g in self.param_groups])
        state_dict = super().state_dict()
        if distribution.mode == "single":
            return state_dict
        result = distributed_checkpoint.consolidate(distribution, state_dict, to)
        distribution.consolidated = result
        return result

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict, as torch.optim does, after checking it; nothing changes if a check fails.

        Pre-hooks run first (a returned dict replaces the loaded one), then: the numbers of groups and
        parameters, every loaded group's hyperparameters (missing ones taken from this optimizer's
        defaults, as torch.optim's ``__setstate__`` does), and every state tensor's shape against what
        the parameter needs. State keeps its precision (float32, or float64 for float64 parameters or
        ``state_dtype``); a plain-number ``step`` becomes a tensor. Post-hooks run last.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        new_groups, hypers = [], []
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {group_index} of the loaded state dict has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}"
                )
            new_group = {**self._own_defaults(), "skipped_steps": 0, **saved, "params": group["params"]}
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            try:
                hypers.append(self._check_group(new_group))
            except ValueError as error:
                raise ValueError(f"param group {group_index} of the loaded state dict: {error}") from None
            new_groups.append(new_group)
        distribution = self._distribution
        distribution.plan(self, new_groups, hypers, loading=True)
        distributed_checkpoint.check_share(distribution, state_dict, type(self).__name__)
        checked = []
        for group_index, (saved, group, hyper) in enumerate(zip(saved_groups, self.param_groups, hypers)):
            base = distribution.first_index(self.param_groups, group_index)
            for param_index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                value = saved_state.get(saved_id)
                if not value:  # no state, or another rank's in a share
                    continue
                where = describe(group_index, param_index, param.shape)
                shapes = distributed_checkpoint.global_view(value)
                for key, expected in self._expected_state_shapes(param, hyper).items():
                    if key in self._optional_state_keys and key not in shapes:
                        continue  # an older checkpoint: the step rebuilds it
                    problem = _shape_mismatch(shapes.get(key), expected)
                    if problem is not None:
                        raise ValueError(f"loaded state does not match {where}: state[{key!r}]: {problem}")
                if "step" in value:
                    _step_count(value["step"])  # raises for a bad count
                checked.append((base + param_index, param, value, hyper))
        restored = {}
        for index, param, value, hyper in checked:  # collectives only after every check passed
            value = distributed_checkpoint.import_entry(distribution, index, value)
            if value is not None:  # None: another rank steps it
                restored[param] = (value, hyper)
        known = set(chain.from_iterable(g["params"] for g in saved_groups))
        state: Dict[Any, Dict[str, Any]] = defaultdict(dict)
        for param, (value, hyper) in restored.items():
            state[param] = {
                key: (_step_count(v) if key == "step" else _cast_state(v, device=self._state_device(param), dtype=state_dtype(param, hyper)))
                for key, v in value.items()
            }
        state.update({k: v for k, v in saved_state.items() if k not in known})  # torch keeps such entries
        self.__setstate__({"state": state, "param_groups": new_groups})
        self._layouts = {param: self._layout_key(hyper, param) for param, (_, hyper) in restored.items()}
        distribution.mark_others(self)
        distribution.consolidated = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
