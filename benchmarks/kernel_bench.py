"""Cost model and timings of SOAP's fused step (soap_optim.kernels).

For each layer shape m x n (GPT-2 124M: 768x768, 768x3072, 3072x768; a 1B model: 2048x2048, 2048x8192)
it prints, per matrix and per step, the FLOPs and the compulsory bytes of every stage of the fused step
(rotate: 2 products, the second with the Adam epilogue; unrotate: 2 products, the second applying the
update; factors: 2 Gram products; the elementwise work rides in the epilogues), and the roofline floor
max(FLOPs / peak, bytes / bandwidth) summed over stages (each stage is its own launch).

Default peaks are an H100 SXM's dense numbers: 67 TFLOP/s fp32 (CUDA cores; the "fp32" precision),
494.7 TFLOP/s TF32 and 989.4 TFLOP/s bf16 (tensor cores), 3.35 TB/s HBM3. Override them with flags.

On CUDA it times the fused step against the unfused one (the twins, batched torch.bmm) and the floor.
On the CPU it times the batched twin (B matrices in one bmm per product) against a loop over the B
matrices, interleaved, and reports medians and their ratio (small sizes: under a minute on 2 cores).

    python benchmarks/kernel_bench.py                  # CPU: cost table + batched-vs-loop timing
    python benchmarks/kernel_bench.py --batch 8        # CUDA: cost table + fused vs unfused vs floor
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

GPT2_AND_1B_SHAPES = "768x768,768x3072,3072x768,2048x2048,2048x8192"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- cost model
def step_stages(m: int, n: int, *, precision: str, param_bytes: int, grad_bytes: int, symmetric: bool = True):
    """[(stage, FLOPs, bytes)] of one fused SOAP step on one m x n matrix with both bases.

    Bytes are compulsory traffic: every operand read once, every result written once (ideal reuse in
    on-chip memory and L2). The intermediate T of a two-sided rotation is stored in bf16 under
    precision="bf16", else fp32. Moments, bases, factors and the direction are fp32.
    """
    mn = m * n
    scratch = 2 if precision == "bf16" else 4
    gram_share = 0.5 if symmetric else 1.0  # upper-triangle tiles only (plus the diagonal, ignored here)
    return [
        ("rotate  G Q_R", 2 * mn * n, grad_bytes * mn + 4 * n * n + scratch * mn),
        # Q_L^T T, then m, v read and written, direction written; ~10 flops per element in the epilogue.
        ("rotate  Q_L^T T +adam", 2 * m * mn + 10 * mn, 4 * m * m + scratch * mn + 16 * mn + 4 * mn),
        ("unrot   N Q_R^T", 2 * mn * n, 4 * mn + 4 * n * n + scratch * mn),
        # Q_L T, then params read and written.
        ("unrot   Q_L T +apply", 2 * m * mn + 4 * mn, 4 * m * m + scratch * mn + 2 * param_bytes * mn),
        ("factor  G G^T", gram_share * 2 * m * mn, grad_bytes * mn + 8 * m * m),
        ("factor  G^T G", gram_share * 2 * mn * n, grad_bytes * mn + 8 * n * n),
    ]


def _peaks(args):
    """Peak TFLOP/s per rotation precision; tf32x3 runs three TF32 products for each one."""
    return {"fp32": args.peak_fp32_tflops, "tf32x3": args.peak_tf32_tflops / 3, "tf32": args.peak_tf32_tflops,
            "bf16": args.peak_bf16_tflops}


def floor_seconds(stages, peak_flops: float, bandwidth: float) -> float:
    return sum(max(flops / peak_flops, nbytes / bandwidth) for _, flops, nbytes in stages)


def print_cost_table(shapes, args) -> None:
    peaks = _peaks(args)
    bandwidth = args.bandwidth_tbps * 1e12
    print(f"Per-matrix cost of one fused SOAP step (both sides preconditioned; params/grads {args.param_dtype}).")
    print(f"Peaks: fp32 {peaks['fp32']} / tf32x3 {peaks['tf32x3']:.1f} / tf32 {peaks['tf32']} / bf16 {peaks['bf16']} TFLOP/s, "
          f"{args.bandwidth_tbps} TB/s; floor = sum over stages of max(FLOPs/peak, bytes/bandwidth).")
    header = f"{'shape':>11} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7}" + "".join(
        f" {'floor ' + p + ' us':>15}" for p in peaks
    )
    print(header)
    for m, n in shapes:
        row = f"{m:>5}x{n:<5} "
        for index, precision in enumerate(peaks):
            stages = step_stages(m, n, precision=precision, param_bytes=BYTES[args.param_dtype],
                                 grad_bytes=BYTES[args.param_dtype])
            if index == 0:
                flops = sum(s[1] for s in stages)
                nbytes = sum(s[2] for s in stages)
                row += f"{flops / 1e9:>8.2f} {nbytes / 1e6:>8.1f} {flops / nbytes:>7.0f}"
            row += f" {floor_seconds(stages, peaks[precision] * 1e12, bandwidth) * 1e6:>15.1f}"
        print(row)
    if args.stages:
        m, n = shapes[0]
        print(f"\nStages of {m}x{n} ({args.precision}):")
        for name, flops, nbytes in step_stages(m, n, precision=args.precision, param_bytes=BYTES[args.param_dtype],
                                               grad_bytes=BYTES[args.param_dtype]):
            print(f"  {name:<24} {flops / 1e9:8.3f} GFLOP {nbytes / 1e6:8.2f} MB")
    print()


# --------------------------------------------------------------------------- a step on a bucket
def make_bucket(batch, m, n, *, device, param_dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return dict(
        grad=randn(batch, m, n).to(param_dtype),
        params=randn(batch, m, n).to(param_dtype),
        q_left=torch.linalg.qr(randn(batch, m, m))[0],
        q_right=torch.linalg.qr(randn(batch, n, n))[0],
        exp_avg=torch.zeros(batch, m, n, device=device),
        exp_avg_sq=torch.zeros(batch, m, n, device=device),
        left=torch.zeros(batch, m, m, device=device),
        right=torch.zeros(batch, n, n, device=device),
        step_size=torch.full((batch,), 1e-3, device=device),
    )


def soap_step(ops, b, precision):
    direction = ops.rotate_adam_(b["grad"], b["q_left"], b["q_right"], b["exp_avg"], b["exp_avg_sq"],
                                 beta1=0.95, beta2=0.95, eps=1e-8, precision=precision)
    ops.unrotate_apply_(direction, b["q_left"], b["q_right"], b["params"], step_size=b["step_size"], decay=1e-5,
                        precision=precision)
    ops.factor_ema_(b["left"], b["right"], b["grad"], 0.95)


def slice_bucket(b, index):
    return {key: value[index:index + 1] for key, value in b.items()}


# --------------------------------------------------------------------------- CUDA
def cuda_time(fn, repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run_cuda(kernels, shapes, args) -> None:
    fused, twin = kernels.get_ops(True), kernels.get_ops(False)
    peaks = _peaks(args)
    print(f"CUDA ({torch.cuda.get_device_name()}), B={args.batch}, precision={args.precision}, "
          f"params/grads {args.param_dtype}; median of {args.repeats} (after warm-up)")
    print(f"{'shape':>11} {'fused ms':>9} {'unfused ms':>11} {'speedup':>8} {'floor ms':>9} {'fused/floor':>12}")
    # the unfused path rounds its operands as the kernels do (the twins emulate every precision)
    for m, n in shapes:
        timings = {}
        for name, ops in (("fused", fused), ("unfused", twin)):
            bucket = make_bucket(args.batch, m, n, device="cuda", param_dtype=DTYPES[args.param_dtype])
            for _ in range(3):
                soap_step(ops, bucket, args.precision)
            timings[name] = cuda_time(lambda: soap_step(ops, bucket, args.precision), args.repeats)
            del bucket
        stages = step_stages(m, n, precision=args.precision, param_bytes=BYTES[args.param_dtype],
                             grad_bytes=BYTES[args.param_dtype])
        floor = args.batch * floor_seconds(stages, peaks[args.precision] * 1e12, args.bandwidth_tbps * 1e12)
        print(f"{m:>5}x{n:<5} {timings['fused'] * 1e3:>9.3f} {timings['unfused'] * 1e3:>11.3f} "
              f"{timings['unfused'] / timings['fused']:>8.2f} {floor * 1e3:>9.3f} {timings['fused'] / floor:>12.2f}")
        if args.compare_routing:
            # the rotation's shape rule (_triton_common.rotation_prefers_cublas): the kernels against torch.bmm
            rotate = importlib.import_module("soap_optim.kernels.rotate_adam")
            unrotate = importlib.import_module("soap_optim.kernels.unrotate_apply")
            common = importlib.import_module("soap_optim.kernels._triton_common")
            bucket = make_bucket(args.batch, m, n, device="cuda", param_dtype=DTYPES[args.param_dtype])
            result = {}
            for routed in (False, True):
                def run():
                    b = bucket
                    direction = rotate.rotate_adam_impl(
                        b["grad"], b["q_left"], b["q_right"], b["exp_avg"], b["exp_avg_sq"], beta1=0.95,
                        beta2=0.95, eps=1e-8, precision=args.precision, route_to_cublas=routed)
                    unrotate.unrotate_apply_impl(
                        direction, b["q_left"], b["q_right"], b["params"], step_size=b["step_size"], decay=1e-5,
                        precision=args.precision, route_to_cublas=routed)
                run()
                result[routed] = cuda_time(run, args.repeats)
            picks = common.rotation_prefers_cublas(args.batch, m, n, (n, m), args.precision)
            print(f"{'':>11} rotations: kernels {result[False] * 1e3:.3f} ms, torch.bmm {result[True] * 1e3:.3f} ms "
                  f"(the rule picks {'torch.bmm' if picks else 'the kernels'})")
        if args.compare_symmetric:
            factor_ema = importlib.import_module("soap_optim.kernels.factor_ema")
            bucket = make_bucket(args.batch, m, n, device="cuda", param_dtype=DTYPES[args.param_dtype])
            result = {}
            for upper_only in (True, False):
                def run():
                    factor_ema.factor_ema_impl(bucket["left"], bucket["right"], bucket["grad"], 0.95,
                                               upper_only=upper_only)
                run()
                result[upper_only] = cuda_time(run, args.repeats)
            print(f"{'':>11} factor_ema upper-triangle {result[True] * 1e3:.3f} ms, full square "
                  f"{result[False] * 1e3:.3f} ms (ratio {result[True] / result[False]:.2f})")


# --------------------------------------------------------------------------- CPU
def run_cpu(kernels, args) -> None:
    twin = kernels.get_ops(False)
    shapes = parse_shapes(args.cpu_sizes)
    torch.set_num_threads(args.cpu_threads)
    print(f"CPU ({torch.get_num_threads()} threads): batched twin (B={args.cpu_batch} matrices, one bmm per "
          f"product) vs a loop over the matrices; interleaved, median of {args.repeats}")
    print(f"{'shape':>11} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13}")
    for m, n in shapes:
        batched = make_bucket(args.cpu_batch, m, n, device="cpu", param_dtype=DTYPES[args.param_dtype])
        looped = make_bucket(args.cpu_batch, m, n, device="cpu", param_dtype=DTYPES[args.param_dtype])
        slices = [slice_bucket(looped, i) for i in range(args.cpu_batch)]

        def run_batched():
            soap_step(twin, batched, args.precision)

        def run_loop():
            for part in slices:
                soap_step(twin, part, args.precision)

        run_batched()
        run_loop()
        times = {"batched": [], "loop": []}
        for repeat in range(args.repeats):
            order = (("batched", run_batched), ("loop", run_loop))
            for name, fn in order if repeat % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        batched_s, loop_s = statistics.median(times["batched"]), statistics.median(times["loop"])
        print(f"{m:>5}x{n:<5} {batched_s * 1e3:>11.3f} {loop_s * 1e3:>9.3f} {loop_s / batched_s:>13.2f}")


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        m, n = item.lower().split("x")
        shapes.append((int(m), int(n)))
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=GPT2_AND_1B_SHAPES, help="layer shapes mxn, comma-separated")
    parser.add_argument("--batch", type=int, default=4, help="matrices per bucket (CUDA timing)")
    parser.add_argument("--precision", choices=("fp32", "tf32x3", "tf32", "bf16"), default="fp32",
                        help="rotation products' input precision for the timings")
    parser.add_argument("--param-dtype", choices=tuple(DTYPES), default="fp32", help="params and grads dtype")
    parser.add_argument("--peak-fp32-tflops", type=float, default=67.0, help="default: H100 SXM fp32 (CUDA cores)")
    parser.add_argument("--peak-tf32-tflops", type=float, default=494.7, help="default: H100 SXM dense TF32")
    parser.add_argument("--peak-bf16-tflops", type=float, default=989.4, help="default: H100 SXM dense bf16")
    parser.add_argument("--bandwidth-tbps", type=float, default=3.35, help="default: H100 SXM HBM3")
    parser.add_argument("--stages", action="store_true", help="also print the stages of the first shape")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 20 CUDA, 9 CPU)")
    parser.add_argument("--cpu-sizes", default="32x32,64x64,128x96", help="CPU timing shapes mxn")
    parser.add_argument("--cpu-batch", type=int, default=16, help="matrices per bucket (CPU timing)")
    parser.add_argument("--compare-routing", action="store_true",
                        help="CUDA: also time the rotations on the kernels and on torch.bmm (the shape rule's choice)")
    parser.add_argument("--compare-symmetric", action="store_true",
                        help="CUDA: also time factor_ema with upper-triangle tiles against the full square")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads for the CPU timing (default 1: on a small shared machine OpenMP "
                             "barriers can stall for a scheduler tick, ~15 ms, which swamps what is measured)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)

    kernels = importlib.import_module("soap_optim.kernels")
    shapes = parse_shapes(args.shapes)
    print_cost_table(shapes, args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        args.repeats = args.repeats or 20
        run_cuda(kernels, shapes, args)
    else:
        args.repeats = args.repeats or 9
        run_cpu(kernels, args)


if __name__ == "__main__":
    main()
