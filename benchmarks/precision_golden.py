"""Each rotation precision on the golden trajectories: the largest deviation from the SOAP reference.

Replays every golden case (../shared/golden, or SOAP_GOLDEN_DIR) for 30 steps on the batched path, whose
rotation products round their operands as the GPU kernels do (the twins emulate fp32, tf32x3, tf32 and
bf16 exactly, up to the order of float32 sums), so this is what each precision does to a trajectory
without needing a GPU. The reference tolerance for float32 runs is 2e-5 (max abs over steps and entries).

    python benchmarks/precision_golden.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from golden import golden_cases, load_case, replay  # noqa: E402

from soap_optim.kernels.reference import PRECISIONS  # noqa: E402

TOLERANCE = 2e-5


def deviations():
    """{precision: {case: max abs deviation from the reference's float32 trajectory}}."""
    table = {p: {} for p in PRECISIONS}
    for case in golden_cases():
        data, meta = load_case(case)
        ill_posed = meta["metrics"]["ill_posed_first_eigh"]
        for precision in PRECISIONS:
            trajs = replay(case, "ref_f32", torch.float32, inject_q1=ill_posed, rotation_precision=precision)[0]
            table[precision][case] = max(
                float(np.abs(traj.double().numpy() - data[f"ref_f32__p{k}__traj"]).max()) for k, traj in enumerate(trajs)
            )
    return table


def main() -> None:
    table = deviations()
    cases = sorted(next(iter(table.values())))
    print(f"max |trajectory - reference f32| over 30 steps (tolerance {TOLERANCE:.0e})")
    print(f"{'case':28s}" + "".join(f"{p:>10s}" for p in PRECISIONS))
    for case in cases:
        print(f"{case:28s}" + "".join(f"{table[p][case]:10.1e}" for p in PRECISIONS))
    print(f"{'max':28s}" + "".join(f"{max(table[p].values()):10.1e}" for p in PRECISIONS))


if __name__ == "__main__":
    main()
