"""The package list; everything else is declared in pyproject.toml.

pyproject.toml alone can either list packages by hand or discover them under one directory; soap_optim
needs both: every package under soap_optim/ (found automatically, so a new subpackage needs no edit here)
and soap_optim.kernels with its subpackages, which live in the top-level kernels/ directory (mapped by
package-dir in pyproject.toml).
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["soap_optim", "soap_optim.*"])
    + ["soap_optim.kernels"]
    + ["soap_optim.kernels." + name for name in find_packages(where="kernels")],
)
