"""Run the soap_optim benchmark from a checkout: ``python benchmarks/run.py [flags]`` (``--help`` lists them).

The same as ``python -m soap_optim.bench`` and the ``soap-bench`` command; the code is in soap_optim/bench/.
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("soap_optim") is None:  # not installed: use this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soap_optim.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
