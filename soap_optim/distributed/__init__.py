"""Distribution over ranks (DDP with ``process_group=``; FSDP2, HSDP and tensor-parallel DTensor
parameters): see :mod:`.layer` for the step, :mod:`.placements` and :mod:`.plan` for who holds and who
steps what, :mod:`.exchange` for the collectives and :mod:`.checkpoint` for state dicts. The design, with
what is exact and why, is in ``docs/distributed.md``."""
from .layer import Distribution, WorkItem, chunk_rows
from .ownership import assign_owners, balance


def make_distribution(process_group=None, shard_over_replicas: bool = False) -> Distribution:
    """The distribution layer for an optimizer built with these keywords."""
    return Distribution(process_group, shard_over_replicas=shard_over_replicas)


__all__ = ["Distribution", "WorkItem", "assign_owners", "balance", "chunk_rows", "make_distribution"]
