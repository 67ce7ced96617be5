"""The built wheel installs soap_optim.kernels from kernels/ and no top-level ``kernels`` module.

The wheel is built from a clean copy of the repository, so the test neither leaves build/ or *.egg-info
in the working tree nor picks up stale files from an earlier build there.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEFT_OUT_OF_COPY = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", "bench_out"
)


def run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def packages_in_tree(root: Path, prefix: str) -> set:
    """Dotted names of every directory under ``root`` (itself included) that holds an __init__.py."""
    return {
        ".".join([prefix, *init.parent.relative_to(root).parts])
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=LEFT_OUT_OF_COPY)
    out = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)])
    (built,) = out.glob("soap_optim-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_entries(wheel) -> list:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_kernels_as_a_subpackage(wheel_entries):
    assert "soap_optim/kernels/__init__.py" in wheel_entries


def test_wheel_has_no_top_level_kernels(wheel_entries):
    assert [name for name in wheel_entries if name.startswith("kernels/") or name == "kernels.py"] == []


def test_wheel_holds_every_package_of_the_tree(wheel_entries):
    expected = packages_in_tree(REPO / "soap_optim", "soap_optim") | packages_in_tree(REPO / "kernels", "soap_optim.kernels")
    in_wheel = {name[: -len("/__init__.py")].replace("/", ".") for name in wheel_entries if name.endswith("/__init__.py")}
    assert expected - in_wheel == set()


def test_installed_wheel_imports_kernels_and_nothing_else(wheel, tmp_path):
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)])
    # -S: no site-packages .pth files, so a development (editable) install of soap_optim in this
    # environment can't serve the imports; the environment's site-packages stay on the path only for torch.
    site_dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        site_dirs.append(site.getusersitepackages())
    path = [str(target)] + [d for d in dict.fromkeys(site_dirs) if os.path.isdir(d)]
    check = (
        "import importlib.util, pathlib, sys\n"
        "import soap_optim.kernels\n"
        "target = pathlib.Path(sys.argv[1]).resolve()\n"
        "for module in (sys.modules['soap_optim'], soap_optim.kernels):\n"
        "    assert target in pathlib.Path(module.__file__).resolve().parents, module.__file__\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    run([sys.executable, "-S", "-c", check, str(target)], cwd=tmp_path, env=env)
