"""The benchmark a user runs to decide whether to adopt soap_optim: ``python -m soap_optim.bench``.

It measures, in one run and on this machine, soap_optim's optimizers beside torch's AdamW and beside
other libraries' SOAP and Shampoo when they are installed: ``optimizer.step()`` time and state memory,
training on real data (a byte-level GPT on Python standard-library source, a CNN on scikit-learn's
digits), and a least-squares problem whose badly scaled row and column spaces only a Kronecker-factored
preconditioner handles well. See ``benchmarks/README.md`` for what each number means.

Its optional helpers (tqdm, matplotlib, scikit-learn, the peers) are the ``bench`` and ``bench-peers``
extras; the library itself never imports this subpackage.
"""
from .cli import main, run

__all__ = ["main", "run"]
