"""soap_optim.hidden_groups: embeddings and the output layer unpreconditioned (max_precond_dim=0), the rest as
the optimizer's defaults; max_precond_dim=0 itself against a float64 recomputation of SOAP's Adam."""
import pytest
import torch
import torch.nn as nn

import soap_optim
from soap_optim.bench.tasks import gpt
from soap_optim.groups import embedding_and_output_parameters, hidden_groups, hidden_matrices


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


def test_the_gpt_splits_into_hidden_and_edge_parameters():
    model = gpt(16, 2, 8)
    groups = hidden_groups(model)
    assert len(groups) == 2 and "max_precond_dim" not in groups[0] and groups[1]["max_precond_dim"] == 0
    assert _names(model, groups[1]["params"]) == [
        "byte_embedding.weight", "head.bias", "head.weight", "position_embedding.weight"
    ]
    everything = [p for g in groups for p in g["params"]]
    assert len(everything) == len(list(model.parameters())) == len({id(p) for p in everything})
    assert _names(model, hidden_matrices(model)) == sorted(
        f"blocks.{i}.{name}.weight" for i in range(2) for name in ("qkv", "attn_out", "mlp_in", "mlp_out")
    )


def test_a_tied_output_weight_is_listed_once_and_options_reach_the_edge_group():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.hidden = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    model = Tied()
    assert _names(model, embedding_and_output_parameters(model)) == ["embed.weight"]
    groups = hidden_groups(model, weight_decay=0.0)
    assert groups[1] == {"params": [model.embed.weight], "max_precond_dim": 0, "weight_decay": 0.0}
    assert _names(model, groups[0]["params"]) == ["hidden.bias", "hidden.weight"]


def test_a_model_without_embeddings_keeps_one_group():
    model = nn.Sequential(nn.Linear(3, 5))  # its only Linear is the output layer
    groups = hidden_groups(model)
    assert len(groups) == 1 and groups[0]["max_precond_dim"] == 0


@pytest.mark.parametrize("foreach", [None, False])
def test_max_precond_dim_zero_is_soaps_adam_in_the_standard_basis(foreach):
    """The first call builds state only; then m, v EMAs and the update of SOAP's docstring with Q = I,
    recomputed here in float64 from the same gradients."""
    torch.manual_seed(0)
    lr, (beta1, beta2), eps, decay = 0.05, (0.9, 0.95), 1e-8, 0.1
    params = [nn.Parameter(torch.randn(6, 4, dtype=torch.float64)), nn.Parameter(torch.randn(3, 2, 5, dtype=torch.float64))]
    expected = [p.detach().clone() for p in params]
    optimizer = soap_optim.SOAP(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay, max_precond_dim=0,
                                foreach=foreach)
    m = [torch.zeros_like(p) for p in expected]
    v = [torch.zeros_like(p) for p in expected]
    for call in range(6):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        if call == 0:
            continue
        t = call
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            step = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
            expected[i] = (1 - lr * decay) * (expected[i] - step * m[i] / (v[i].sqrt() + eps))
    for p, want in zip(params, expected):
        assert optimizer.state[p]["factors"] == [None] * p.dim()
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_soap_on_hidden_groups_preconditions_only_the_hidden_side():
    torch.manual_seed(0)
    model = gpt(16, 1, 8)
    optimizer = soap_optim.SOAP(hidden_groups(model), lr=1e-2)
    tokens = torch.randint(0, 256, (4, 9))
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
    edge = {id(p) for p in embedding_and_output_parameters(model)}
    for name, p in model.named_parameters():
        factors = optimizer.state[p]["factors"]
        if id(p) in edge or p.dim() == 1:
            assert all(f is None for f in factors), name
        else:
            assert all(f is not None and f.shape == (n, n) for f, n in zip(factors, p.shape)), name
        assert torch.isfinite(p).all()


def test_shampoo_takes_max_precond_dim_zero_as_its_graft():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    q = nn.Parameter(p.detach().clone())
    ours = soap_optim.Shampoo([p], lr=1e-2, max_precond_dim=0)
    graft = soap_optim.Shampoo([q], lr=1e-2, max_precond_dim=2)  # no axis <= 2: the same graft step
    for _ in range(4):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        graft.step()
    assert torch.equal(p, q) and not torch.equal(p, torch.zeros_like(p))


def test_a_negative_max_precond_dim_is_refused_naming_it():
    with pytest.raises(ValueError, match="max_precond_dim.*-1"):
        soap_optim.SOAP([nn.Parameter(torch.zeros(2, 2))], max_precond_dim=-1)
