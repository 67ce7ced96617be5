"""The benchmark command, run in-process on a tiny setting: it writes its files, its numbers are finite,
and the optimizer-state bytes it reports for SOAP match an independent count."""
from __future__ import annotations

import json
import math

import pytest
import torch

import soap_optim
from soap_optim.bench import cli, tasks

TINY = dict(width=8, depth=1, context=8)


def _numbers(value, path="$"):
    """Every number in a JSON document, with where it is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _soap_state_nbytes(model: torch.nn.Module, kwargs: dict, steps: int) -> int:
    """Sum of ``nbytes`` over every tensor in a fresh SOAP's state after ``steps`` steps."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    optimizer = soap_optim.SOAP(model.parameters(), **kwargs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return sum(t.nbytes for state in optimizer.state.values() for t in _tensors(state))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--optimizers", "torch-adamw,soap",
        "--steps", "4",
        "--width", str(TINY["width"]),
        "--depth", str(TINY["depth"]),
        "--context", str(TINY["context"]),
        "--batch-size", "4",
        "--evals", "2",
        "--lstsq-steps", "6",
        "--precondition-frequency", "2",
        "--timing-periods", "2",
        "--timing-warmup", "2",
        "--no-progress",
        "--device", "cpu",
        "--out", str(out),
    ]
    return cli.run(argv), out


def test_writes_json_and_markdown(tiny_run):
    results, out = tiny_run
    assert (out / "results.json").is_file()
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "torch AdamW" in markdown and "SOAP" in markdown
    for task in ("step", "lm", "lstsq"):
        assert task in results


def test_json_numbers_are_finite(tiny_run):
    _, out = tiny_run
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    numbers = list(_numbers(document))
    assert numbers
    bad = [(path, value) for path, value in numbers if not math.isfinite(value)]
    assert not bad
    for name in ("mlp", "gpt"):
        for key in ("torch-adamw", "soap"):
            result = document["step"][name]["results"][key]
            assert "error" not in result, result
            assert result["median_ms"] > 0 and result["amortized_ms"] > 0 and result["state_bytes"] > 0
    for key in ("torch-adamw", "soap"):
        entry = document["lm"]["optimizers"][key]
        assert entry["error"] is None and entry["final"] is not None


def test_soap_state_bytes_match_an_independent_count(tiny_run):
    results, _ = tiny_run
    kwargs = results["optimizers"]["soap"]["kwargs"]
    models = {
        "mlp": lambda: tasks.mlp(TINY["width"], TINY["depth"]),
        "gpt": lambda: tasks.gpt(TINY["width"], TINY["depth"], TINY["context"]),
    }
    for name, factory in models.items():
        part = results["step"][name]
        steps = part["warmup_steps"] + part["measured_steps"]
        expected = _soap_state_nbytes(factory(), kwargs, steps)
        assert part["results"]["soap"]["state_bytes"] == expected, name
        # SOAP keeps Kronecker factors and bases: more state than AdamW's two moments.
        assert part["results"]["soap"]["state_bytes"] > part["results"]["torch-adamw"]["state_bytes"]
