"""The method itself: P, Φ, collapse, initialisation and parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from continual_rpt.prompts import PromptConfig, ResidualPrompt, initial_prompt

N, D, M = 5, 16, 8


def make(**kw) -> ResidualPrompt:
    torch.manual_seed(0)
    cfg = PromptConfig(n_tokens=N, bottleneck=M, **kw)
    return ResidualPrompt(cfg, torch.randn(N, D), embedding_norm=1.0)


def test_rpt_is_phi_plus_skip_by_hand():
    prompt = make(method="rpt")
    block = prompt.blocks[0]
    P = prompt.prompt
    h = F.relu(P @ block.w1[0] + block.b1[0])
    phi = F.layer_norm(h @ block.w2[0] + block.b2[0], (D,)) * block.ln_weight[0] + block.ln_bias[0]
    torch.testing.assert_close(prompt(), phi + P)


def test_pt_mlp_has_no_skip_and_pt_has_no_network():
    rpt, mlp, pt = make(method="rpt"), make(method="pt-mlp"), make(method="pt")
    torch.testing.assert_close(mlp(), rpt() - rpt.prompt)  # same init (seed 0): only the skip differs
    assert len(pt.blocks) == 0 and torch.equal(pt(), pt.prompt)


def test_parameter_counts():
    rpt = make(method="rpt")
    per_net = 2 * D * M + M + D + 2 * D  # two linears + LayerNorm gain and bias
    assert rpt.trainable_parameters() == N * D + per_net
    assert rpt.stored_parameters() == N * D
    assert make(method="rpt", per_token=True).trainable_parameters() == N * D + N * per_net
    assert make(method="rpt", blocks=2).trainable_parameters() == N * D + 2 * per_net
    assert make(method="rpt", layer_norm=False).trainable_parameters() == N * D + per_net - 2 * D
    assert make(method="pt").trainable_parameters() == N * D


def test_collapse_is_eval_mode_output_and_keeps_training_mode():
    prompt = make(method="rpt", dropout=0.5)
    prompt.train()
    collapsed = prompt.collapse()
    assert prompt.training
    assert not collapsed.requires_grad
    prompt.eval()
    assert torch.equal(collapsed, prompt())  # dropout off: collapse is deterministic
    assert torch.equal(collapsed, prompt.collapse())


def test_per_token_networks_are_independent():
    prompt = make(method="rpt", per_token=True)
    before = prompt().detach()
    with torch.no_grad():
        prompt.blocks[0].w2[2] += 1.0  # only token 2's network changes
    after = prompt().detach()
    changed = (after - before).abs().sum(1) > 0
    assert changed.tolist() == [False, False, True, False, False]


def test_shared_network_treats_equal_tokens_equally():
    torch.manual_seed(0)
    cfg = PromptConfig(n_tokens=3, bottleneck=M)
    prompt = ResidualPrompt(cfg, torch.randn(1, D).repeat(3, 1))
    out = prompt()
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_activations_and_two_blocks_run(activation):
    out = make(method="rpt", activation=activation, blocks=2)()
    assert out.shape == (N, D) and torch.isfinite(out).all()


def test_match_embedding_scale_sets_branch_norm():
    torch.manual_seed(0)
    cfg = PromptConfig(method="pt-mlp", n_tokens=N, bottleneck=M, match_embedding_scale=True)
    prompt = ResidualPrompt(cfg, torch.randn(N, D), embedding_norm=0.5)
    norms = prompt().norm(dim=1)
    torch.testing.assert_close(norms, torch.full((N,), 0.5), atol=1e-3, rtol=1e-3)


def test_initialisations():
    emb = torch.randn(100, D)
    allowed = torch.arange(50, 100)
    g = torch.Generator().manual_seed(0)
    vocab = initial_prompt(PromptConfig(n_tokens=N), emb, allowed, [], g)
    rows = [int((emb == row).all(1).nonzero()[0]) for row in vocab]
    assert all(50 <= r < 100 for r in rows)
    uniform = initial_prompt(PromptConfig(n_tokens=N, init="uniform"), emb, allowed, [], g)
    assert uniform.shape == (N, D) and uniform.min() >= -0.5 and uniform.max() <= 0.5
    text = initial_prompt(PromptConfig(n_tokens=N, init="text", init_text="yes no"), emb, allowed, [7, 9], g)
    assert torch.equal(text, emb[[7, 9, 7, 9, 7]])


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"method": "lora"}, "method"),
        ({"init": "zeros"}, "init"),
        ({"init": "text"}, "init_text"),
        ({"activation": "swish"}, "activation"),
        ({"n_tokens": 0}, "n_tokens"),
        ({"dropout": 1.0}, "dropout"),
        ({"layer_norm": False, "match_embedding_scale": True}, "match_embedding_scale"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        PromptConfig(**kw)
