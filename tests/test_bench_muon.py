"""The benchmark's torch Muon arm: which tensors go to Muon, and that the combined optimizer steps exactly
as torch's Muon and AdamW stepped separately on the same split."""
from __future__ import annotations

import copy

import pytest
import torch

from soap_optim.bench import cli, tasks
from soap_optim.bench.muon import MuonWithAdamW, hidden_matrices, split_groups
from soap_optim.bench.optimizers import Hyper, all_specs

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")


def test_hidden_matrices_of_the_gpt_leave_embeddings_head_and_vectors_to_adamw():
    model = tasks.gpt(16, 2, 8)
    hidden = {id(p) for p in hidden_matrices(model)}
    names = {name for name, p in model.named_parameters() if id(p) in hidden}
    assert names and all(p.dim() == 2 for p in hidden_matrices(model))
    assert not any(name.startswith(("byte_embedding", "position_embedding", "head")) for name in names)
    # every 2-D weight inside the blocks is hidden; nothing else is
    expected = {name for name, p in model.named_parameters() if name.startswith("blocks") and p.dim() == 2}
    assert names == expected


def test_a_bare_matrix_is_hidden_and_a_classifier_head_is_not():
    assert len(hidden_matrices(tasks.KroneckerQuadratic(4, 3, 10.0, 0))) == 1
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    assert [tuple(p.shape) for p in hidden_matrices(mlp)] == [(5, 6)]


def _train(model, optimizers, steps=4):
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(8, 6, generator=generator)
        loss = model(x).square().mean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = 0.02 * (step + 1) / steps  # a schedule reaches every group
            optimizer.step()


def test_combined_optimizer_steps_as_muon_and_adamw_separately():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    combined = MuonWithAdamW(split_groups(model), lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    hidden = hidden_matrices(reference)
    rest = [p for p in reference.parameters() if all(p is not h for h in hidden)]
    separate = [
        torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1),
    ]
    _train(model, [combined])
    _train(reference, separate)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert len(combined.state) == len(list(model.parameters()))


def test_combined_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = MuonWithAdamW(split_groups(model), lr=0.01)
    _train(model, [optimizer], steps=2)
    twin = copy.deepcopy(model)
    twin_optimizer = MuonWithAdamW(split_groups(twin), lr=0.01)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, [optimizer], steps=3)
    _train(twin, [twin_optimizer], steps=3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_spec_builds_from_the_model_and_records_its_settings():
    spec = next(s for s in all_specs() if s.key == "torch-muon")
    model = tasks.gpt(16, 1, 8)
    optimizer = spec.build(model, Hyper(lr=3e-3))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in hidden_matrices(model)}
    assert all(group["lr"] == 3e-3 for group in optimizer.param_groups)
    assert spec.record(Hyper())["kwargs"]["adjust_lr_fn"] == "match_rms_adamw"


def test_step_timing_and_single_seed_tables_include_muon(tmp_path):
    results = cli.run([
        "--optimizers", "torch-adamw,torch-muon", "--tasks", "step,lm", "--steps", "3", "--width", "8",
        "--depth", "1", "--context", "8", "--batch-size", "2", "--evals", "1", "--timing-periods", "1",
        "--timing-warmup", "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path),
    ])
    for model in ("mlp", "gpt"):
        timing = results["step"][model]["results"]["torch-muon"]
        assert timing["median_ms"] > 0 and timing["state_bytes"] > 0
    assert results["lm"]["optimizers"]["torch-muon"]["final"] < 6
    assert "torch Muon + AdamW" in (tmp_path / "results.md").read_text(encoding="utf-8")
