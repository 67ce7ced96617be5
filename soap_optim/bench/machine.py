"""What the benchmark ran on: machine, device, library versions, and how busy the machine was."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any, Dict, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> Optional[float]:
    """1-minute load average (runnable processes): above the core count means other work competed."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def auto_threads(device: torch.device) -> tuple:
    """(torch CPU threads, why): torch's default, minus the cores other work is already using.

    When other processes keep cores busy, torch's threads wait on each other at every parallel
    region: on a 2-core machine with a load average of about 1.5, a width-64 GPT's training step took
    208 ms with two threads and 31 ms with one. The load average is read once, at the start.
    """
    default = torch.get_num_threads()
    load = load_average()
    if device.type != "cpu" or load is None:
        return default, "torch's default"
    free = max(1, usable_cores() - int(round(load)))
    if free >= default:
        return default, f"torch's default (load average {load:.1f} on {usable_cores()} cores)"
    return free, f"fewer than torch's {default}: load average {load:.1f} on {usable_cores()} cores; --threads overrides"


def version_of(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build or on this machine")
    return device


def describe(device: torch.device) -> Dict[str, Any]:
    import soap_optim

    info: Dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": version_of("triton"),
        "numpy": version_of("numpy"),
        "soap_optim": getattr(soap_optim, "__version__", None),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "load_average_at_start": load_average(),
    }
    for extra in ("heavyball", "pytorch-optimizer", "scikit-learn", "matplotlib", "tqdm"):
        info[extra] = version_of(extra)
    return info


def summary_lines(info: Dict[str, Any]) -> list:
    load = info.get("load_average_at_start")
    busy = ""
    if load is not None:
        busy = f"; load average {load:.1f}"
        if load > info["cores"]:
            busy += " (busier than its cores: timings are noisy)"
    return [
        f"machine: {info['cpu']}, {info['cores']} cores{busy}; torch threads {info['torch_threads']} "
        f"({info.get('threads_reason', 'torch default')})",
        f"device: {info['device']} ({info['device_name']})",
        f"python {info['python']}, torch {info['torch']}, triton {info['triton'] or 'not installed'}, "
        f"soap_optim {info['soap_optim']}",
        "peers: "
        + ", ".join(f"{name} {info[name] or 'not installed'}" for name in ("heavyball", "pytorch-optimizer")),
    ]
