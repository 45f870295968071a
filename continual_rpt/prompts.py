"""Residual prompt tuning: the soft prompt P, its reparameterization Φ, and collapse.

Φ(P_i) = φ(P_i) + P_i with φ = Linear(d→m) → act → dropout → Linear(m→d) → LayerNorm(d),
applied to every prompt token (Razdaibiedina et al., 2023). After training, `collapse()`
returns P′ = Φ(P): inference then costs exactly what vanilla prompt tuning costs.

Methods by name: `rpt` (residual Φ), `pt` (Lester et al., P alone), `pt-mlp` (Φ without skip),
and `head`, the control with no prompt at all (only an encoder backbone's task head trains).

Deep prompts, `deep-rpt` and `deep-pt`: P holds n vectors for each of the backbone's L layers,
[L, n, d], and layer l reads P′[l] at the prompt's positions in place of what layer l-1 wrote there
(the backbones do this with forward pre-hooks, see `backbones.base.deep_prompt_hooks`). One Φ is
shared by every layer and token by default: the same per-token map, so its parameters do not grow
with L. Options: `per_layer` (a Φ per layer, L times the parameters) and `layer_embedding` (a
learned vector per layer added to P[l] before the shared Φ). All collapse to the same [L, n, d].
Prompt *states* at every layer rather than key/value prefixes (prefix-tuning, P-tuning v2): the
collapsed P′ keeps the shallow prompt's form, one vector per token and layer, so Φ, collapse, the
bank and mixed-task batches treat deep entries as a stack of shallow ones, and it needs no per-model
cache layout; a prefix would store 2·L·n·d instead of L·n·d.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual_rpt.config_fields import Count, Range, check_ranges, setting

METHODS = ("rpt", "pt", "pt-mlp", "head", "deep-rpt", "deep-pt")
INITS = ("vocab", "uniform", "text")
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}


@dataclass
class PromptConfig:
    """How the soft prompt is built, initialised and reparameterized."""

    method: str = setting("rpt", "rpt (residual Φ), pt (no Φ), pt-mlp (Φ without the skip), head (no prompt: the head-only control), or deep-rpt / deep-pt (a prompt at every layer)")
    n_tokens: Count = setting(10, "number of virtual tokens n")
    init: str = setting("vocab", "vocab (sampled vocabulary embeddings), uniform in [-0.5, 0.5], or text")
    init_text: str = setting("", "text whose token embeddings initialise P (init=text), repeated to n tokens")
    bottleneck: Count = setting(400, "width m of φ's hidden layer")
    activation: str = setting("relu", "φ's non-linearity: relu, tanh or gelu")
    layer_norm: bool = setting(True, "LayerNorm at the end of φ")
    dropout: Annotated[float, Range(low=0, high=1, high_open=True, words="in [0, 1)")] = setting(0.0, "dropout inside φ (training only)")
    per_token: bool = setting(False, "one φ per prompt token instead of one shared φ")
    per_layer: bool = setting(False, "deep-rpt: one φ per layer instead of one shared by all layers")
    layer_embedding: bool = setting(False, "deep-rpt: a learned vector per layer (zero at the start) added to P before Φ")
    blocks: Count = setting(1, "number of stacked reparameterization blocks")
    match_embedding_scale: bool = setting(False, "initialise φ's LayerNorm gain so that φ(P_i) starts at the norm of the backbone's word embeddings")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.init not in INITS:
            raise ValueError(f"init: {self.init!r} is not one of {', '.join(INITS)}")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("init_text: must be a non-empty text when init is 'text'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        check_ranges(self)
        for name in ("per_layer", "layer_embedding"):
            if getattr(self, name) and self.method != "deep-rpt":
                raise ValueError(f"{name}: applies to deep-rpt (a Φ at every layer), not to {self.method}")
        if self.match_embedding_scale and not self.layer_norm:
            raise ValueError("match_embedding_scale: needs layer_norm, whose gain sets φ's output scale")

    @property
    def uses_prompt(self) -> bool:
        """Whether there is a prompt at all (every method but the head-only control)."""
        return self.method != "head"

    @property
    def reparameterized(self) -> bool:
        """Whether P goes through Φ (rpt, pt-mlp) or is used as it is (pt)."""
        return self.method in ("rpt", "pt-mlp", "deep-rpt")

    @property
    def deep(self) -> bool:
        """Whether there is a prompt at every layer (deep-rpt, deep-pt) or at the input only."""
        return self.method.startswith("deep-")


class Reparameterization(nn.Module):
    """One block of φ, batched over `n_nets` independent networks (1 = shared by all tokens)."""

    def __init__(self, n_nets: int, d: int, cfg: PromptConfig, gain: float = 1.0) -> None:
        super().__init__()
        m = cfg.bottleneck
        self.skip = cfg.method in ("rpt", "deep-rpt")
        self.activation = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)
        # nn.Linear's default init, one copy per network, so shared and per-token start alike.
        self.w1 = nn.Parameter(_linear_init(n_nets, d, m))
        self.b1 = nn.Parameter(_linear_init(n_nets, d, m, bias=True))
        self.w2 = nn.Parameter(_linear_init(n_nets, m, d))
        self.b2 = nn.Parameter(_linear_init(n_nets, m, d, bias=True))
        self.ln_weight = nn.Parameter(torch.full((n_nets, d), gain)) if cfg.layer_norm else None
        self.ln_bias = nn.Parameter(torch.zeros(n_nets, d)) if cfg.layer_norm else None

    def forward(self, prompt: Tensor, nets: slice = slice(None)) -> Tensor:
        """prompt: [n, d] -> [n, d] through networks `nets` (one, broadcast over tokens, or one per token)."""
        x = prompt.unsqueeze(1)  # [n, 1, d]
        h = self.dropout(self.activation(x @ self.w1[nets] + self.b1[nets].unsqueeze(1)))  # [n, 1, m]
        y = (h @ self.w2[nets] + self.b2[nets].unsqueeze(1)).squeeze(1)  # [n, d]
        if self.ln_weight is not None:
            y = F.layer_norm(y, y.shape[-1:]) * self.ln_weight[nets] + self.ln_bias[nets]
        return y + prompt if self.skip else y


def _linear_init(n_nets: int, fan_in: int, fan_out: int, bias: bool = False) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    shape = (n_nets, fan_out) if bias else (n_nets, fan_in, fan_out)
    return torch.empty(shape).uniform_(-bound, bound)


class ResidualPrompt(nn.Module):
    """Trainable soft prompt P (n × d) with the optional reparameterization Φ."""

    def __init__(self, cfg: PromptConfig, init: Tensor, embedding_norm: float | None = None) -> None:
        super().__init__()
        if init.dim() != (3 if cfg.deep else 2) or init.shape[-2] != cfg.n_tokens:
            raise ValueError(f"initial prompt has shape {tuple(init.shape)}, expected ({'L, ' if cfg.deep else ''}{cfg.n_tokens}, d)")
        self.cfg = cfg
        d = init.shape[-1]
        self.prompt = nn.Parameter(init.detach().clone().float())
        gain = 1.0
        if cfg.match_embedding_scale:
            if embedding_norm is None:
                raise ValueError("match_embedding_scale needs the backbone's mean word-embedding norm")
            gain = embedding_norm / math.sqrt(d)  # LayerNorm output has norm ≈ √d · gain
        self.nets_per_layer = cfg.n_tokens if cfg.per_token else 1
        layers = init.shape[0] if cfg.per_layer else 1
        blocks = [Reparameterization(layers * self.nets_per_layer, d, cfg, gain) for _ in range(cfg.blocks)] if cfg.reparameterized else []
        self.blocks = nn.ModuleList(blocks)
        # Zero at the start, so a layer embedding changes nothing until it trains; it tells a shared Φ which layer it serves.
        self.layer_embedding = nn.Parameter(torch.zeros(init.shape[0], 1, d)) if cfg.layer_embedding else None

    def forward(self) -> Tensor:
        """Φ(P): [n, d] in fp32 ([L, n, d] for a deep prompt: every layer through the shared Φ, or its own)."""
        if self.prompt.dim() == 2:
            return self._phi(self.prompt, slice(None))
        k = self.nets_per_layer
        prompt = self.prompt if self.layer_embedding is None else self.prompt + self.layer_embedding
        return torch.stack([self._phi(layer, slice(l * k, (l + 1) * k) if self.cfg.per_layer else slice(None))
                            for l, layer in enumerate(prompt)])

    def _phi(self, x: Tensor, nets: slice) -> Tensor:
        for block in self.blocks:
            x = block(x, nets)
        return x

    @torch.no_grad()
    def collapse(self) -> Tensor:
        """P′ = Φ(P) in eval mode (no dropout), detached: all that inference needs."""
        was_training = self.training
        self.eval()
        collapsed = self().detach().clone()
        self.train(was_training)
        return collapsed

    def trainable_parameters(self) -> int:
        """Parameters that train: P plus every block of φ."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def stored_parameters(self) -> int:
        """Parameters kept after collapse: P′ alone, n·d (L·n·d deep)."""
        return self.prompt.numel()


def initial_prompt(
    cfg: PromptConfig, embeddings: Tensor, vocab_ids: Tensor, text_ids: list[int], generator: torch.Generator, layers: int = 1
) -> Tensor:
    """Starting values of P, [n, d] ([layers, n, d] for a deep prompt, each layer drawn anew).

    Sampled vocabulary rows, uniform noise, or a text's embeddings. `vocab_ids` are the ids that
    `vocab` may sample (ordinary tokens, no special or unused ones); `text_ids` are the token ids of
    `cfg.init_text` (ignored unless init is `text`).
    """
    if cfg.deep:
        flat = dataclasses.replace(cfg, method="rpt", per_layer=False, layer_embedding=False)
        return torch.stack([initial_prompt(flat, embeddings, vocab_ids, text_ids, generator) for _ in range(layers)])
    n, d = cfg.n_tokens, embeddings.shape[1]
    if cfg.init == "vocab":
        picks = vocab_ids[torch.randint(len(vocab_ids), (n,), generator=generator)]
        return embeddings[picks].detach().float().clone()
    if cfg.init == "uniform":
        # Shape (n, d): the original code's uniform init wrongly built (n, vocab).
        return torch.rand(n, d, generator=generator) - 0.5
    if not text_ids:
        raise ValueError(f"init_text: {cfg.init_text!r} has no tokens in this backbone's vocabulary")
    repeated = (text_ids * math.ceil(n / len(text_ids)))[:n]
    return embeddings[torch.tensor(repeated)].detach().float().clone()
