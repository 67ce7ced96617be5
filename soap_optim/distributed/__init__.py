"""Distribution over ranks (DDP with ``process_group=``, FSDP2's DTensor parameters): see :mod:`.layer`."""
from .layer import LOCAL, Distribution, WorkItem, chunk_rows
from .ownership import assign_owners, balance


def make_distribution(process_group=None) -> Distribution:
    """The distribution layer for an optimizer built with ``process_group`` (None: no keyword)."""
    return Distribution(process_group)


__all__ = ["LOCAL", "Distribution", "WorkItem", "assign_owners", "balance", "chunk_rows", "make_distribution"]
