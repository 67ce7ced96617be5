"""Other libraries' SOAP and Shampoo, measured beside soap_optim's when they are installed.

Each peer gets a small adapter from the shared :class:`~soap_optim.bench.optimizers.Hyper` to its own
argument names. Where a peer's default differs from SOAP's reference in a way that changes the
algorithm (heavyball's merged dims and probabilistic refresh schedule), the adapter sets it to match,
and the exact keyword arguments are recorded in the results. A peer that is not installed, or does
not import, is skipped with a note.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import List, Optional, Tuple

from .optimizers import OptimizerSpec


def _import(module: str, distribution: str) -> Tuple[Optional[object], str, Optional[str]]:
    """(module, "dist version", None) or (None, "dist", why it is unavailable)."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None, distribution, f"{distribution} is not installed (pip install {distribution}, or the bench-peers extra)"
    try:
        return importlib.import_module(module), f"{distribution} {version}", None
    except Exception as error:  # a peer built for another torch can fail in any way on import
        return None, f"{distribution} {version}", f"{distribution} {version} does not import ({type(error).__name__}: {error})"


def heavyball_specs(compile_step: bool) -> List[OptimizerSpec]:
    module, source, why = _import("heavyball", "heavyball")
    cls = getattr(module, "SOAP", None) if module is not None else None
    if module is not None and cls is None:
        why = f"{source} has no SOAP class"
    notes = [
        "merge_dims=False, precondition_1d=False and use_precond_schedule=False (a refresh every "
        "precondition_frequency steps) to match SOAP's reference; its other options at their defaults",
    ]

    def prepare() -> None:
        if not compile_step:
            # heavyball compiles its update functions with torch.compile unless this module switch is
            # None. On a 2-core CPU compiling took minutes and the compiled steps ran slower than eager
            # ones, so the default here is eager; --heavyball-compile turns compilation back on.
            utils = importlib.import_module("heavyball.utils")
            utils.compile_mode = None
            if hasattr(utils, "compile_mode_recommended_to_none"):
                utils.compile_mode_recommended_to_none = None

    notes.append(
        "torch.compile on (heavyball's default; compile time is inside the first steps)"
        if compile_step
        else "eager: heavyball.utils.compile_mode = None (--heavyball-compile restores its torch.compile default)"
    )
    return [
        OptimizerSpec(
            "heavyball-soap",
            "heavyball SOAP",
            source,
            cls,
            lambda h: dict(
                lr=h.lr,
                betas=h.betas,
                shampoo_beta=h.betas[1],  # soap_optim's shampoo_beta=-1 means betas[1]
                eps=h.eps,
                weight_decay=h.weight_decay,
                precondition_frequency=h.precondition_frequency,
                max_precond_dim=h.max_precond_dim,
                merge_dims=False,
                precondition_1d=False,
                use_precond_schedule=False,
            ),
            lambda h: h.precondition_frequency,
            prepare=prepare,
            notes=notes,
            unavailable=why if cls is None else None,
        )
    ]


def pytorch_optimizer_specs() -> List[OptimizerSpec]:
    module, source, why = _import("pytorch_optimizer", "pytorch-optimizer")
    soap = getattr(module, "SOAP", None) if module is not None else None
    shampoo = getattr(module, "ScalableShampoo", None) if module is not None else None
    rmsprop_graft = None
    if module is not None:
        try:
            rmsprop_graft = importlib.import_module("pytorch_optimizer.optimizer.utils.graft").LayerWiseGrafting.RMSPROP
        except Exception:  # the enum moved: leave the Shampoo peer out rather than guess
            shampoo = None
    return [
        OptimizerSpec(
            "pytorch-optimizer-soap",
            "pytorch_optimizer SOAP",
            source,
            soap,
            lambda h: dict(
                lr=h.lr,
                betas=h.betas,
                shampoo_beta=h.betas[1],
                eps=h.eps,
                weight_decay=h.weight_decay,
                precondition_frequency=h.precondition_frequency,
                max_precondition_dim=h.max_precond_dim,
                merge_dims=False,
                precondition_1d=False,
                correct_bias=True,
                normalize_gradient=False,
            ),
            lambda h: h.precondition_frequency,
            unavailable=why if soap is None else None,
        ),
        OptimizerSpec(
            "pytorch-optimizer-shampoo",
            "pytorch_optimizer ScalableShampoo",
            source,
            shampoo,
            lambda h: dict(
                lr=h.lr,
                betas=h.betas,
                weight_decay=h.weight_decay,
                decoupled_weight_decay=True,
                start_preconditioning_step=h.precondition_frequency,
                preconditioning_compute_steps=h.precondition_frequency,
                block_size=h.max_precond_dim,
                no_preconditioning_for_layers_with_dim_gt=h.max_precond_dim,
                graft_type=rmsprop_graft,
                nesterov=False,
                diagonal_eps=h.eps,
            ),
            lambda h: h.precondition_frequency,
            notes=[
                "its Shampoo with Adam-like grafting (RMSProp graft, betas shared); its plain Shampoo "
                "has no grafting, so its step size is not comparable at a shared lr",
            ],
            unavailable=(why or "pytorch_optimizer has no ScalableShampoo") if shampoo is None else None,
        ),
    ]


def peers(heavyball_compile: bool = False) -> List[OptimizerSpec]:
    return heavyball_specs(heavyball_compile) + pytorch_optimizer_specs()
