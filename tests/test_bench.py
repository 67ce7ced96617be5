"""The benchmark command, run in-process on a tiny setting: it writes its files, its numbers are finite,
and the optimizer-state bytes it reports for SOAP match an independent count."""
from __future__ import annotations

import json
import math

import pytest
import torch

import soap_optim
from soap_optim.bench import cli, report, tasks

TINY = dict(width=8, depth=1, context=8)
MUON = ",torch-muon" if hasattr(torch.optim, "Muon") else ""  # the arm is skipped with a note on older torch


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


# ------------------------------------------------------------------ seeds, intervals, tuning, swap
from soap_optim.bench import presets, stats  # noqa: E402
from soap_optim.bench.seeded import aggregate  # noqa: E402
from soap_optim.bench.training import Run  # noqa: E402
from soap_optim.bench.tune import choose, grid_of  # noqa: E402


def test_t_quantiles_match_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 31, 45, 200, 10_000):
        assert stats.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3), df


def test_t_quantile_table_and_expansion_agree_where_they_meet():
    # The tabulated value at 30 and the expansion's at 30 and 31 must agree and decrease monotonically.
    assert abs(stats.t_quantile_975(30) - 2.0423) < 1e-3
    values = [stats.t_quantile_975(df) for df in range(1, 60)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert 1.959 < stats.t_quantile_975(10 ** 6) < 1.961


def test_interval_of_known_sample():
    # mean 2, sample sd 1 over n = 4: half-width t_{0.975,3} / 2.
    values = [1.0, 3.0, 1.0, 3.0]  # mean 2, sd sqrt(4/3)
    spread = stats.interval(values)
    half = 3.182 * math.sqrt(4.0 / 3.0) / 2.0
    assert spread.mean == pytest.approx(2.0)
    assert (spread.low, spread.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert stats.interval([5.0, float("inf"), None]).n == 1  # non-finite values are left out
    assert stats.interval([5.0]).low is None


def test_compare_calls_overlap_not_significant():
    a = stats.interval([1.0, 1.1, 0.9])
    b = stats.interval([2.0, 2.1, 1.9])
    c = stats.interval([1.05, 1.5, 0.7])
    assert stats.compare(a, b) == "better" and stats.compare(b, a) == "worse"
    assert stats.compare(c, a) == "not significant"
    assert stats.compare(stats.interval([1.0]), a) is None


def _run(key, lr, seed, losses, seconds_per_step=1.0):
    run = Run(key, key, lr, None, None, seed=seed)
    run.curve = [{"step": i, "seconds": i * seconds_per_step, "loss": v, "val_loss": v + lr} for i, v in enumerate(losses)]
    return run


def test_aggregate_pairs_each_seed_with_the_reference():
    runs = []
    for seed, shift in enumerate((0.0, 0.1, 0.2)):
        runs.append(_run("torch-adamw", 0.01, seed, [3.0, 2.5, 2.4, 2.0 + shift]))
        # reaches the reference's final (2.0 + shift) at step 2 on every seed, at half the seconds per step
        runs.append(_run("soap", 0.01, seed, [3.0, 2.3, 1.9 + shift, 1.5], seconds_per_step=0.5))
    result = aggregate(runs, ("torch-adamw", 0.01))
    soap = result["optimizers"]["soap@0.01"]
    assert soap["reached"] == 3
    assert soap["steps_to_target"]["mean"] == pytest.approx(2.0)
    assert soap["fraction_of_reference_steps"]["mean"] == pytest.approx(2 / 3)
    assert soap["fraction_of_reference_seconds"]["mean"] == pytest.approx(1 / 3)
    assert soap["final"]["mean"] == pytest.approx(1.5)
    assert soap["vs_reference"] == "better"
    assert result["targets_per_seed"] == pytest.approx([2.0, 2.1, 2.2])
    assert soap["band"]["mean"][2] == pytest.approx(2.0)  # mean of 1.9, 2.0, 2.1 at step 2


def test_choose_uses_the_selection_metric_not_the_reported_one():
    runs = []
    for seed in range(2):
        # lr 0.1 ends lower on the reported loss but higher on val_loss (val_loss = loss + lr)
        runs.append(_run("soap", 0.1, seed, [3.0, 1.00]))
        runs.append(_run("soap", 0.01, seed, [3.0, 1.05]))
    chosen, record = choose(runs, "val_loss")
    assert chosen == {"soap": 0.01}
    assert record["grid"]["soap"]["0.1"] == pytest.approx(1.1)
    assert grid_of(1e-2, (0.3, 3.0)) == [3e-3, 1e-2, 3e-2]  # the shared lr is always on the grid


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded")
    argv = [
        "--optimizers", "torch-adamw,soap" + MUON,
        "--tasks", "finetune,lstsq",
        "--seeds", "2", "--tune", "--tune-grid", "0.5,2", "--swap",
        "--finetune-steps", "6", "--lstsq-steps", "8", "--evals", "2", "--batch-size", "8",
        "--precondition-frequency", "2", "--no-progress", "--device", "cpu", "--out", str(out),
    ]
    return cli.run(argv), out


def test_seeded_run_reports_every_table_on_the_same_seeds(seeded_run):
    results, out = seeded_run
    for task in ("finetune", "lstsq"):
        section = results[task]
        assert section["seeds"] == [0, 1]
        for table in ("shared", "best", "swap"):
            entries = section[table]["optimizers"]
            assert entries, (task, table)
            for entry in entries.values():
                assert entry["seeds"] == [0, 1]
                assert entry["final"]["n"] == 2 and entry["final"]["low"] <= entry["final"]["mean"] <= entry["final"]["high"]
        assert section["shared"]["optimizers"]["soap@0.003" if task == "finetune" else "soap@0.03"]
        grid = section["grid"]["grid"]["soap"]
        assert len(grid) == 3 and section["best"]["optimizers"]
        recipe = section["swap"]["recipe"]
        assert tuple(recipe["betas"]) == (0.9, 0.999)
        assert recipe["lr"] == section["swap"]["adamw_lr_grid"]["chosen"]["torch-adamw"]
        keys = {e["key"] for e in section["swap"]["optimizers"].values()}
        assert {"torch-adamw", "soap", "soap-lr-x", "soap-betas"} <= keys
        if MUON:  # torch's Muon is an arm of every seeded table: shared lr, its own best lr, the swap
            for table in ("shared", "best", "swap"):
                assert "torch-muon" in {e["key"] for e in section[table]["optimizers"].values()}, (task, table)
            assert "torch-muon" in section["grid"]["grid"]
    # least squares chooses lr on other instances than the reported ones
    assert results["lstsq"]["grid"]["selection_seeds"] == [1000, 1001]
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "One-line swap" in markdown and "own best lr" in markdown
    plots = [out / "finetune_swap.png", out / "lstsq_best.png"]
    if report.matplotlib_missing() is None:
        assert all(plot.is_file() for plot in plots)
    else:  # the bench extra is not installed: no plots, and a note that says why
        assert not any(plot.exists() for plot in plots)


def test_seeded_finals_match_single_seed_runs(tmp_path):
    """The seeded tables are built from real runs: the first seed of a seeded run is the single-seed run."""
    common = ["--optimizers", "torch-adamw,soap", "--tasks", "finetune", "--finetune-steps", "6", "--evals", "2",
              "--batch-size", "8", "--precondition-frequency", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    single = cli.run(common + ["--seed", "1"])["finetune"]["optimizers"]
    seeded = cli.run(common + ["--seed", "1", "--seeds", "2"])["finetune"]["shared"]["optimizers"]
    for key in ("torch-adamw", "soap"):
        assert seeded[f"{key}@0.003"]["seeds"] == [1, 2]
        per_seed = seeded[f"{key}@0.003"]["final_per_seed"]
        assert per_seed[0] == pytest.approx(single[key]["final"], rel=1e-6)
        assert per_seed[0] != per_seed[1]  # another seed: other weights and batches
    assert seeded["soap@0.003"]["final"]["mean"] == pytest.approx(sum(seeded["soap@0.003"]["final_per_seed"]) / 2)


def test_preset_gpt_25m_in_its_shortened_form(tmp_path):
    results = cli.run([
        "--preset", "gpt-25m", "--tasks", "lm", "--optimizers", "torch-adamw", "--steps", "2", "--batch-size", "1",
        "--context", "8", "--heldout-windows", "1", "--evals", "1", "--no-progress", "--device", "cpu",
        "--out", str(tmp_path),
    ])
    model = results["lm"]["model"]
    assert (model["width"], model["depth"]) == (512, 8)  # from the preset
    assert model["context"] == 8 and results["lm"]["steps"] == 2  # the flags override it
    assert 20e6 < model["parameters"] < 40e6
    assert results["settings"]["train_bytes"] == presets.PRESETS["gpt-25m"]["train_bytes"]
    assert math.isfinite(results["lm"]["optimizers"]["torch-adamw"]["final"])


def test_first_step_skipped_and_warmed_up_wrappers():
    from soap_optim.bench.diagnosis import first_step_skipped, warmed_up

    def one_step(cls, steps, **kwargs):
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = cls([weight], lr=0.5, **kwargs)
        moves = []
        for _ in range(steps):
            weight.grad = torch.ones(3)
            before = weight.detach().clone()
            optimizer.step()
            moves.append((weight.detach() - before)[0].item())
        return moves, optimizer

    assert one_step(first_step_skipped(torch.optim.SGD), 2)[0] == [0.0, pytest.approx(-0.5)]
    moves, optimizer = one_step(warmed_up(torch.optim.SGD, 4), 5)
    assert moves == pytest.approx([-0.125, -0.25, -0.375, -0.5, -0.5])
    assert optimizer.param_groups[0]["lr"] == 0.5  # the ramp does not leak into the lr the loop set


def test_diagnosis_runs_every_suspect_on_the_seeds():
    from soap_optim.bench import problems
    from soap_optim.bench.diagnosis import diagnose
    from soap_optim.bench.optimizers import ours
    from soap_optim.bench.suite import Settings

    settings = Settings(finetune_steps=4, evals=2, batch_size=8, precondition_frequency=2, progress=False)
    task = problems.finetune(settings, torch.device("cpu"))
    specs = [spec for spec in ours() if spec.key in ("torch-adamw", "soap")]
    recipe = settings.hyper(3e-3, betas=(0.9, 0.999))
    result = diagnose(task, specs, recipe, [0, 1], torch.device("cpu"), False)
    keys = {entry["key"] for entry in result["optimizers"].values()}
    assert keys == {"torch-adamw", "soap", "adamw-first-step-skipped", "soap-warmup", "soap-beta2", "soap-lr-x2", "soap-lr-x5"}
    skipped = result["optimizers"]["adamw-first-step-skipped@0.003"]
    plain = result["optimizers"]["torch-adamw@0.003"]
    assert all(e["seeds"] == [0, 1] and e["final"]["n"] == 2 for e in result["optimizers"].values())
    assert skipped["final_per_seed"] != plain["final_per_seed"]  # one update fewer changes the result


def test_shared_settings_are_soaps_class_defaults():
    """The benchmark's shared betas and refresh period are SOAP's own defaults, read from the class."""
    from soap_optim.bench.optimizers import Hyper
    from soap_optim.bench.suite import Settings

    group = soap_optim.SOAP([torch.nn.Parameter(torch.ones(2, 2))]).param_groups[0]
    for shared in (Hyper(), Settings()):
        assert tuple(shared.betas) == tuple(group["betas"])
        assert shared.precondition_frequency == group["precondition_frequency"]
    reference = soap_optim.SOAP([torch.nn.Parameter(torch.ones(2, 2))], **soap_optim.SOAP.REFERENCE).param_groups[0]
    assert reference["betas"] == (0.95, 0.95) and reference["precondition_frequency"] == 10
