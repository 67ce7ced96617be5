"""The shared eigenbasis core: pure functions used by SOAP and the rest of the family."""
from .bases import initial_basis, refreshed_basis
from .factors import halve_saturating_sums_, mode_gram, update_factors_, without_overflowing_grams, zero_factors
from .moments import permute_axes_, refresh_bases_
from .plan import (
    DATA_FORMATS,
    Plan,
    check_plan_options,
    make_plan,
    merge_shape,
    plan_for,
    plan_for_shape,
    unpreconditioned_plan,
)
from .projection import project, project_back

__all__ = [
    "DATA_FORMATS",
    "Plan",
    "check_plan_options",
    "halve_saturating_sums_",
    "initial_basis",
    "make_plan",
    "merge_shape",
    "mode_gram",
    "permute_axes_",
    "plan_for",
    "plan_for_shape",
    "project",
    "project_back",
    "refresh_bases_",
    "refreshed_basis",
    "unpreconditioned_plan",
    "update_factors_",
    "without_overflowing_grams",
    "zero_factors",
]
