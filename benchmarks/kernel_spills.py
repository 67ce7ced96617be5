"""Compile every kernel configuration for an H100 (sm_90a) on the CPU and report registers and spills.

No GPU is needed: Triton compiles to PTX, and the ptxas bundled with Triton assembles it for sm_90a
with ``-v``, which prints per kernel the registers used and the bytes of spill stores/loads (spills go
to local memory; they never show in the PTX, only in ptxas' report). Every configuration the launchers
can pick is compiled (see ``_triton_common.matmul_config`` and ``factor_ema.gram_config``), for every
code path a constexpr selects (precision, operand dtypes, epilogues).

    python benchmarks/kernel_spills.py            # the table
    python benchmarks/kernel_spills.py --check    # exit status 1 on any spill (the test runs this)

Run it without TRITON_INTERPRET (the interpreter skips the compiler).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import torch

POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64"}
f32, bf16, f16, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int64


def _ptxas() -> str:
    """The ptxas Triton itself runs for sm_90 (Triton 3.9 bundles two; the older one rejects its PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"Triton's ptxas for sm_90 is not available ({path!r})")
    return path


def _compile_ptx(kernel, constexprs: Dict, num_warps: int, num_stages: int, args: Dict):
    """PTX of ``kernel`` for sm_90a with the given constexprs and argument types (no GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # through autotune/heuristics wrappers
    constexprs, signature = dict(constexprs), {}
    for name in fn.arg_names:
        if name not in constexprs and name not in args:
            raise KeyError(f"{fn.__name__}: no value for {name}")
        value = constexprs.get(name, args.get(name))
        if name in constexprs or isinstance(value, (bool, str)) or not isinstance(value, (torch.dtype, int, float)):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[name] = POINTER[value]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False),
    )
    return fn.__name__, compiled.asm["ptx"]


_REPORT = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(ptx: str) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            # Triton's own ptxas options for these kernels (fusion off: see _triton_common.launch_options)
            [_ptxas(), "-v", "--fmad=false", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o",
             os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr[-2000:]}")
    spills = _REPORT.search(result.stderr)
    registers = _REGISTERS.search(result.stderr)
    if spills is None or registers is None:
        raise RuntimeError(f"no register report in ptxas' output: {result.stderr[-2000:]}")
    return int(registers.group(1)), int(spills.group(2)), int(spills.group(3))


def _strides(prefix: str) -> Dict[str, int]:
    return {f"stride_{prefix}{axis}": 1 for axis in "bmnkdrc"}


def cases() -> List[Tuple[str, object, Dict, int, int, Dict]]:
    """(label, kernel, constexprs, num_warps, num_stages, argument types) for every configuration."""
    from soap_optim.kernels import _triton_common as common
    from soap_optim.kernels import adam, factor_ema, rotate_adam, unrotate_apply
    from soap_optim.kernels.reference import PRECISIONS

    found = []
    tiles = {id(c): c for precision in PRECISIONS for c in common.compiled_matmul_configs(precision)}
    for config in tiles.values():
        tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        tile = f"{tile} w{config.num_warps} s{config.num_stages}"
        for precision in [p for p in PRECISIONS if config in common.compiled_matmul_configs(p)]:
            prec, dot = common.dot_precisions(precision)
            scratch = bf16 if precision == "bf16" else f32
            flags = dict(PRECISION=prec, DOT_PRECISION=dot, INTERPRETED=False, **config.kwargs)
            found.append((f"matmul {precision} {tile}", common._matmul_kernel, flags, config.num_warps,
                          config.num_stages, dict(a_ptr=f32, b_ptr=f32, c_ptr=scratch, M=1, N=1, K=1,
                                                  **_strides("a"), **_strides("b"), **_strides("c"))))
            for grad in (f32, bf16):
                operand = scratch if precision == "bf16" else f32
                found.append((f"rotate_adam {precision} grad={str(grad)[6:]} {tile}", rotate_adam._rotate_adam_kernel,
                              dict(HAS_A=True, **flags), config.num_warps, config.num_stages,
                              dict(a_ptr=grad, b_ptr=operand, m_ptr=f32, v_ptr=f32, d_ptr=f32, M=1, N=1, K=1,
                                   beta1=0.9, beta2=0.9, eps=1e-8, **_strides("a"), **_strides("b"))))
            for normalize in (False, True):
                for params in ((f32, bf16) if not normalize else (f32,)):
                    found.append((f"unrotate_apply {precision} normalize={normalize} p={str(params)[6:]} {tile}",
                                  unrotate_apply._unrotate_apply_kernel,
                                  dict(HAS_A=True, NORMALIZE=normalize, **flags), config.num_warps, config.num_stages,
                                  dict(a_ptr=f32, b_ptr=scratch, p_ptr=params, step_ptr=f32, decay=0.1, u_ptr=f32,
                                       partial_ptr=f32, partials_per_matrix=1, M=1, N=1, K=1,
                                       **_strides("a"), **_strides("b"))))
        # no basis at all: the epilogues on G itself (no product, precision irrelevant)
        flags = dict(PRECISION="fp32", DOT_PRECISION="ieee", INTERPRETED=False, **config.kwargs)
        found.append((f"rotate_adam no-basis {tile}", rotate_adam._rotate_adam_kernel, dict(HAS_A=False, **flags),
                      config.num_warps, config.num_stages,
                      dict(a_ptr=f32, b_ptr=bf16, m_ptr=f32, v_ptr=f32, d_ptr=f32, M=1, N=1, K=1, beta1=0.9,
                           beta2=0.9, eps=1e-8, **_strides("a"), **_strides("b"))))
        found.append((f"unrotate_apply no-basis {tile}", unrotate_apply._unrotate_apply_kernel,
                      dict(HAS_A=False, NORMALIZE=False, **flags), config.num_warps, config.num_stages,
                      dict(a_ptr=f32, b_ptr=f32, p_ptr=bf16, step_ptr=f32, decay=0.1, u_ptr=f32, partial_ptr=f32,
                           partials_per_matrix=1, M=1, N=1, K=1, **_strides("a"), **_strides("b"))))
    for config in factor_ema.compiled_gram_configs():
        tile = f"{config.kwargs['BLOCK']}x{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
        for grad in (f32, bf16, f16):
            for upper, accumulate in ((True, False), (False, True)):
                precision = "fp32" if grad == f32 else "native"
                found.append((f"gram_ema grad={str(grad)[6:]} upper={upper} beta1={accumulate} {tile}",
                              factor_ema._gram_ema_kernel,
                              dict(ACCUMULATE=accumulate, UPPER_ONLY=upper, PRECISION=precision, INTERPRETED=False,
                                   **config.kwargs), config.num_warps, config.num_stages,
                              dict(x_ptr=grad, f_ptr=f32, D=1, K=1, beta=0.9, **_strides("x"), **_strides("f"))))
    block = unrotate_apply._APPLY_BLOCK
    found.append((f"apply_normalized {block}x{block}", unrotate_apply._apply_normalized_kernel,
                  dict(NORMALIZE_EPS=1e-30, INTERPRETED=False, BLOCK_M=block, BLOCK_N=block), 4, 1,
                  dict(u_ptr=f32, sum_sq_ptr=f32, p_ptr=bf16, step_ptr=f32, decay=0.1, M=1, N=1, **_strides("p"))))
    for p, g in ((f32, f32), (bf16, bf16), (f16, f32)):
        found.append((f"adam p={str(p)[6:]} g={str(g)[6:]} {adam._BLOCK}", adam._adam_kernel,
                      dict(P_DTYPE=adam._TL_DTYPES[p], G_DTYPE=adam._TL_DTYPES[g], STEP_FROM_PTR=True,
                           DECAY_FIRST=False, INTERPRETED=False, BLOCK=adam._BLOCK), 4, 1,
                      dict(p_table=i64, g_table=i64, m_table=i64, v_table=i64, numel_table=i64, tensor_of=i64,
                           block_of=i64, step_ptr=f32, beta1=0.9, beta2=0.9, eps=1e-8, step_size=0.1,
                           denom_scale=1.0, decay=0.1)))
    return found


def report(jobs: int = 2) -> List[Tuple[str, int, int, int]]:
    """(label, registers, spill store bytes, spill load bytes) for every case."""

    def one(case):
        label, kernel, constexprs, warps, stages, args = case
        _, ptx = _compile_ptx(kernel, constexprs, warps, stages, args)
        return (label, *ptxas_report(ptx))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, cases()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit with status 1 if any configuration spills")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    rows = report(args.jobs)
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel / configuration':<{width}}  regs  spill-st  spill-ld")
    for label, registers, stores, loads in rows:
        print(f"{label:<{width}}  {registers:4d}  {stores:8d}  {loads:8d}")
    spilling = [r for r in rows if r[2] or r[3]]
    print(f"{len(rows)} configurations compiled for sm_90a, {len(spilling)} spill")
    return 1 if args.check and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
