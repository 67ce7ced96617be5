"""Held state memory and step time of SOAP's batched path when bucket membership changes.

A mixture-of-experts layer: ``--experts`` same-shaped expert weights, each with a gradient on a random
half of the steps (the experts the router sent tokens to). The batched path steps the experts with a
gradient as one bucket whose state lives in stacked buffers (``soap_optim.buckets``). Reported:

* the memory ratio: bytes of every storage the optimizer's state keeps alive, over the bytes of the
  state tensors themselves (1.0: nothing held beyond the state; ``torch.save(opt.state_dict())`` writes
  whole storages, so its size follows the same ratio), after every step, worst and last;
* the mean step time over the measured steps (after ``--warmup`` steps), with ``foreach=False`` (one
  expert at a time) beside it as the yardstick. Time ratios are only comparable within one run.

    python benchmarks/bucket_memory.py --experts 64 --dim 64 --steps 60

``--gpt``: peak memory and step time of SOAP's default step on a 12.9M-parameter byte-level GPT (width
512, 4 blocks; random gradients), with ``rollback_on_error`` on and off: the growth of the resident set
over the steps (high-water mark reset before them, ``/proc/self/clear_refs``; Linux), each configuration
in a fresh process. ``--baseline DIR`` (repeatable) runs every configuration (MoE and GPT) also with the soap_optim
package found in DIR (e.g. ``git archive <commit> soap_optim kernels``, kernels copied to
soap_optim/kernels), interleaved with this checkout's runs, so that before/after ratios come from one run
(``--interleaved``: step times with all packages in one process, stepped in turn on the same routing and
gradients; without it each configuration runs in a fresh process, which peak memory needs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from soap_optim import SOAP


def state_tensors(opt):
    for state in opt.state.values():
        for value in state.values():
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    yield tensor


def memory_ratio(opt) -> float:
    """Bytes of the distinct storages under the state, over the state tensors' own bytes."""
    own, held = 0, {}
    for tensor in state_tensors(opt):
        own += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values()) / own


def run(experts: int, dim: int, steps: int, warmup: int, foreach, seed: int = 0, rollback: bool = True):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(dim, dim, generator=gen)) for _ in range(experts)]
    opt = SOAP([{"params": params, "rollback_on_error": rollback}], lr=1e-3, precondition_frequency=10,
               foreach=foreach, fused=False)
    ratios, seconds = [], 0.0
    for step in range(steps):
        chosen = torch.rand(experts, generator=gen) < 0.5
        chosen[step % experts] = True  # at least one expert per step
        for param, active in zip(params, chosen.tolist()):
            param.grad = torch.randn(dim, dim, generator=gen) if active else None
        start = time.perf_counter()
        opt.step()
        if step >= warmup:
            seconds += time.perf_counter() - start
        ratios.append(memory_ratio(opt))
    return max(ratios), ratios[-1], seconds / (steps - warmup)


def _resident_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def gpt_run(steps: int, rollback: bool, seed: int = 0):
    """(peak resident growth over ``steps`` steps in MB, mean step time in s) for SOAP on the 12.9M GPT."""
    from soap_optim.bench.tasks import gpt

    torch.manual_seed(seed)
    model = gpt(512, 4, 128)
    params = list(model.parameters())
    opt = SOAP([{"params": params, "rollback_on_error": rollback}])
    gen = torch.Generator().manual_seed(seed)

    def step():
        for param in params:
            param.grad = torch.randn(param.shape, generator=gen) * 1e-2
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    for _ in range(3):  # the first step builds the state; then a refresh (every 2 steps by default)
        step()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark
    resident = _resident_mb("VmRSS")
    seconds = [step() for _ in range(steps)]
    return _resident_mb("VmHWM") - resident, sum(seconds) / len(seconds)


def _child(args) -> None:
    torch.set_num_threads(1)
    if args.child == "gpt":
        peak, mean = gpt_run(args.steps, args.rollback)
        print(json.dumps({"peak_mb": peak, "step_s": mean}))
    else:
        worst, last, mean = run(args.experts, args.dim, args.steps, args.warmup, None, rollback=args.rollback)
        print(json.dumps({"worst": worst, "last": last, "step_s": mean}))


def _participation(pattern: str, experts: int, step: int, gen: torch.Generator) -> torch.Tensor:
    """Which of the ``experts`` matrices get a gradient at ``step``: "experts", each on a random half of
    the steps (at least one per step); "frozen", all for 5 steps, then every other one never again;
    "layerdrop", blocks of 8 (layers) dropped together with probability 0.3; "all", every one."""
    draw = torch.rand(experts, generator=gen)  # drawn for every pattern: the gradients stay the same
    if pattern == "experts":
        chosen = draw < 0.5
        chosen[step % experts] = True
        return chosen
    if pattern == "frozen":
        return (torch.arange(experts) % 2 == 0) | (step < 5)
    if pattern == "layerdrop":
        return (draw[torch.arange(experts) // 8] >= 0.3) | (torch.arange(experts) == step % experts)
    return torch.ones(experts, dtype=torch.bool)


def _load_package(path: str, alias: str):
    """The soap_optim package under ``path`` imported as ``alias``, beside this checkout's (its imports are
    relative, so the two never mix)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(path, "soap_optim", "__init__.py"),
        submodule_search_locations=[os.path.join(path, "soap_optim")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def interleaved(args) -> None:
    """The step time of every (package, rollback) configuration in one process, stepped in turn on the same
    routing and gradients (the order rotating every step), so that load on the machine hits them alike;
    median (and mean) step time and the median's ratio to the first configuration's. Memory ratio after
    every step. The MoE layer (``precondition_frequency=10``), or with ``--gpt`` the GPT (SOAP's defaults,
    every parameter with a gradient). ``--pattern``: which experts get a gradient (random half, half
frozen, LayerDrop-like blocks, all)."""
    packages = [("this checkout", sys.modules["soap_optim"])] + [
        (f"baseline {i + 1}", _load_package(path, f"soap_optim_baseline_{i + 1}")) for i, path in enumerate(args.baseline)
    ]
    gen = torch.Generator().manual_seed(0)
    if args.gpt:
        from soap_optim.bench.tasks import gpt

        initial = [p.detach().clone() for p in gpt(512, 4, 128).parameters()]
        options = {}
    else:
        initial = [torch.randn(args.dim, args.dim, generator=gen) for _ in range(args.experts)]
        options = dict(lr=1e-3, precondition_frequency=10, fused=False)
    runs = []
    for name, package in packages:
        for rollback in (True, False):
            params = [torch.nn.Parameter(t.clone()) for t in initial]
            opt = package.SOAP([{"params": params, "rollback_on_error": rollback}], **options)
            runs.append({"name": name, "rollback": rollback, "params": params, "opt": opt, "times": [], "worst": 0.0})
    for step in range(args.steps):
        if args.gpt:
            grads = [torch.randn(t.shape, generator=gen) * 1e-2 for t in initial]
        else:
            chosen = _participation(args.pattern, args.experts, step, gen)
            grads = [torch.randn(args.dim, args.dim, generator=gen) if active else None for active in chosen.tolist()]
        for k in range(len(runs)):
            run_ = runs[(step + k) % len(runs)]
            for param, grad in zip(run_["params"], grads):
                param.grad = None if grad is None else grad.clone()
            start = time.perf_counter()
            run_["opt"].step()
            if step >= args.warmup:
                run_["times"].append(time.perf_counter() - start)
            run_["worst"] = max(run_["worst"], memory_ratio(run_["opt"]))
    reference = None
    for run_ in runs:
        median = sorted(run_["times"])[len(run_["times"]) // 2]
        reference = reference or median
        mean = sum(run_["times"]) / len(run_["times"])
        print(f"{run_['name']:14s} rollback_on_error={str(run_['rollback']):5s}  step {median * 1e3:6.2f} ms "
              f"(median, x{median / reference:.2f}; mean {mean * 1e3:.2f})  memory ratio worst {run_['worst']:.3f} "
              f"last {memory_ratio(run_['opt']):.3f}")


def _compare(args) -> None:
    """Every (package, rollback) configuration in a fresh process, interleaved ``--repeats`` times."""
    trees = [("this checkout", None)] + [(f"baseline {i + 1}", path) for i, path in enumerate(args.baseline or [])]
    results = {}
    for _ in range(args.repeats):
        for name, path in trees:
            for rollback in (True, False):
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the resident set
                if path:
                    env["PYTHONPATH"] = path
                command = [sys.executable, __file__, "--child", "gpt" if args.gpt else "moe", "--steps",
                           str(args.steps), "--warmup", str(args.warmup), "--experts", str(args.experts),
                           "--dim", str(args.dim)] + (["--rollback"] if rollback else [])
                out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                results.setdefault((name, rollback), []).append(json.loads(out.strip().splitlines()[-1]))
    for (name, rollback), runs in results.items():
        step = min(r["step_s"] for r in runs) * 1e3
        extra = (f"peak +{max(r['peak_mb'] for r in runs):.0f} MB" if args.gpt
                 else f"memory ratio worst {max(r['worst'] for r in runs):.3f} last {runs[-1]['last']:.3f}")
        print(f"{name:14s} rollback_on_error={str(rollback):5s}  step {step:.2f} ms (best of {len(runs)})  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pattern", choices=("experts", "frozen", "layerdrop", "all"), default="experts",
                        help="which experts get a gradient each step (--interleaved; see _participation)")
    parser.add_argument("--gpt", action="store_true", help="the 12.9M-parameter GPT instead of the MoE layer")
    parser.add_argument("--baseline", action="append", help="a directory holding an older soap_optim package to "
                        "compare with (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interleaved", action="store_true", help="step times of every configuration in one "
                        "process, stepped in turn (peak memory needs --gpt without it: a fresh process each)")
    parser.add_argument("--child", choices=("moe", "gpt"), help=argparse.SUPPRESS)
    parser.add_argument("--rollback", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
    elif args.interleaved:
        torch.set_num_threads(1)
        interleaved(args)
    elif args.gpt or args.baseline:
        _compare(args)
    else:
        for name, foreach in (("batched", None), ("one at a time", False)):
            worst, last, mean = run(args.experts, args.dim, args.steps, args.warmup, foreach)
            print(f"{name:14s} memory ratio worst {worst:.3f} last {last:.3f}   step {mean * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
