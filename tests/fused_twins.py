"""One check shared by the variants' tests: an optimizer run through the fused Triton kernels (interpreted on the
CPU when there is no GPU) equals the same run on their PyTorch twins, parameters and every state tensor."""
from __future__ import annotations

import os

import pytest
import torch


def assert_fused_equals_pytorch(make, shapes, steps: int = 7, seed: int = 12) -> None:
    """``make(params, fused=...)`` builds the optimizer; both runs see the same parameters and gradients."""
    pytest.importorskip("triton", reason="triton is not installed: the fused path cannot run")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(fused):
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
        opt = make(params, fused=fused)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        return params, opt

    (fused_params, fused_opt), (plain_params, plain_opt) = run(True), run(False)
    for pf, pp in zip(fused_params, plain_params):
        torch.testing.assert_close(pf, pp, rtol=1e-5, atol=2e-5)
        for key, value in fused_opt.state[pf].items():
            other = plain_opt.state[pp][key]
            pairs = zip(value, other) if isinstance(value, list) else [(value, other)]
            for a, b in pairs:
                if a is not None:
                    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, msg=key)
