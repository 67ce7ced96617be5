"""Replaying the golden trajectories of the SOAP reference (see ../shared/golden/README.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import numpy as np
import torch

GOLDEN_DIR = Path(os.environ.get("SOAP_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
N_STEPS = 30


def golden_cases() -> List[str]:
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p.stem for p in GOLDEN_DIR.glob("*.npz"))


def load_case(name: str):
    data = np.load(GOLDEN_DIR / f"{name}.npz")
    return data, json.loads(str(data["meta"]))


def replay(name: str, run: str, dtype: torch.dtype, inject_q1: bool = False, optimizer_cls=None, **overrides):
    """Run the optimizer on a golden problem; returns (trajectories per param, optimizer, params)."""
    from soap_optim import SOAP

    optimizer_cls = optimizer_cls or SOAP
    data, meta = load_case(name)
    # the trajectories were recorded with the reference implementation's defaults, stated explicitly here
    hp = {**SOAP.REFERENCE, **meta["hp"], **overrides}
    if meta["model"] != "quad":
        raise NotImplementedError(meta["model"])
    params = []
    for k, (_, shape) in enumerate(meta["params"]):
        init = torch.tensor(data[f"data__p{k}__init"], dtype=dtype).reshape(shape)
        params.append(torch.nn.Parameter(init.clone()))
    problems = [
        (torch.tensor(data[f"data__p{k}__A"], dtype=dtype), torch.tensor(data[f"data__p{k}__y"], dtype=dtype))
        for k in range(len(params))
    ]
    opt = optimizer_cls(params, **hp)
    trajs = [[p.detach().clone()] for p in params]
    for t in range(1, N_STEPS + 1):
        rows = [(16 * (t - 1) + i) % 64 for i in range(32)]
        for p, (A, y) in zip(params, problems):
            A_t, y_t = A[rows], y[rows]
            r = A_t @ p.detach().reshape(-1) - y_t
            p.grad = (A_t.T @ r / 32).reshape(p.shape)
        opt.step()
        if t == 1 and inject_q1:
            inject_bases(opt, params, data, run)
        for traj, p in zip(trajs, params):
            traj.append(p.detach().clone())
    return [torch.stack(tr) for tr in trajs], opt, params, data, meta


def inject_bases(opt, params, data, run: str) -> None:
    for k, p in enumerate(params):
        bases = opt.state[p].get("bases")
        if bases is None:
            continue
        for j in range(len(bases)):
            key = f"{run}__p{k}__Q1__f{j}"
            if key in data.files:
                bases[j] = torch.tensor(data[key], dtype=bases[j].dtype)
