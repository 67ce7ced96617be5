"""The kernels compiled on a GPU, each suite in its own process.

Triton decides when a kernel is defined whether it is interpreted (``TRITON_INTERPRET``), for the whole
process. So the CUDA cases (``cuda_kernel_cases.py``) run in a fresh pytest process without the
interpreter, where they also assert that they are compiled; on a CUDA machine the interpreter suite
(``test_kernels.py``) runs in another fresh process with CUDA hidden. Without a GPU the CUDA cases still
run here, interpreted on the CPU with small shapes, so that the cases themselves are checked.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

TESTS = pathlib.Path(__file__).resolve().parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")


def _pytest(path: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    env.update(env_changes)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / path)]
    return subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1800)


@needs_cuda
def test_cuda_cases_compiled_in_their_own_process():
    result = _pytest("cuda_kernel_cases.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@needs_cuda
def test_interpreter_suite_in_its_own_process():
    result = _pytest("test_kernels.py", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the cases run compiled instead")
def test_cuda_cases_under_the_interpreter():
    result = _pytest("cuda_kernel_cases.py", TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
