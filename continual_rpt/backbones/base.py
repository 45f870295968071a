"""What every backbone family shares: frozen weights, tokenizer, embedding table, fingerprint.

A family says where the prompt enters, how a batch is scored, and what head a task gets. To add
a family: subclass `Backbone`, set `family` to its name, implement `from_pretrained` (load the
weights), `featurize` (tokenise examples once), `collate` (pad a batch into tensors), `loss`
(training objective), `scores` (one score per option, for prediction), `input_features` (a prompt-free
vector per example, for routing), `new_head` (the per-task trainable head, or None),
`prompt_layers` (the layers a deep prompt reaches: `deep_prompt_hooks` does the rest) and
`max_positions` (the longest sequence, prompt included); then add one
row to `FAMILIES` in `continual_rpt/backbones/__init__.py` naming the model types it serves.
The backbone's weights are frozen and never handed to an optimizer.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from continual_rpt.tasks import Example, Task

ATTENTIONS = ("auto", "sdpa", "eager")
# x86 CPU flags of native bf16 arithmetic; without them torch emulates bf16 on a CPU, slower than fp32
# (a MiniLM training step: 1.2 s in bf16 against 0.44 s in fp32 on such a CPU, issue 28).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FORMAT_TOKENS = 3  # leading tokens whose states describe an input's form, in the routing features
_NOT_ORDINARY = re.compile(r"^\[.*\]$|^<.*>$")  # [unused12], [CLS], <extra_id_0>, </s>


def native_bf16(device_type: str, cpu_flags: frozenset[str], cuda_bf16: bool) -> bool:
    """Whether bf16 is the fast precision: on a CUDA device that computes it (`cuda_bf16`), or a CPU with one of BF16_CPU_FLAGS."""
    if device_type == "cuda":
        return cuda_bf16
    return device_type == "cpu" and not cpu_flags.isdisjoint(BF16_CPU_FLAGS)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux's /proc/cpuinfo lists them; empty elsewhere (then bf16 is never assumed native)."""
    # torch has no public query: torch.backends.cpu.get_cpu_capability() says AVX512 with or without avx512_bf16.
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return next((frozenset(line.partition(":")[2].split()) for line in lines if line.startswith("flags")), frozenset())


def device_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (`native_bf16` of this machine's hardware)."""
    cuda = False
    if device.type == "cuda":
        with torch.cuda.device(device):  # Ampere and later, and ROCm; on older GPUs bf16 is emulated
            cuda = torch.cuda.is_bf16_supported(including_emulation=False)
    return native_bf16(device.type, cpu_flags() if device.type == "cpu" else frozenset(), cuda)


@dataclass
class Features:
    """One example, tokenised once: encoder `ids` hold one sequence per pair, seq2seq one source."""

    ids: list[list[int]]
    types: list[list[int]]
    targets: list[list[int]]
    label: int

    @property
    def length(self) -> int:
        """Tokens this example costs in a forward pass, for length bucketing."""
        return sum(len(s) for s in self.ids) + sum(len(t) for t in self.targets)


@dataclass
class RowPrompts:
    """One prompt per example of a mixed-task batch: `embeds` [B, N, d], each prompt right-aligned in its
    row, `mask` [B, N] marking its real slots (an entry of n < N tokens leaves N − n masked slots in front).
    Deep prompts add `layers` [B, L - 1, N, d], the prompt of layers 1 … L - 1, and `deep` [B], which rows
    have them (a shallow row's later layers keep what the layer before wrote)."""

    embeds: Tensor
    mask: Tensor
    layers: Tensor | None = None
    deep: Tensor | None = None

    @classmethod
    def stack(cls, prompts: list[Tensor | None], width: int, device: torch.device) -> RowPrompts:
        """Gather each example's prompt ([n, d], [L, n, d], or None for an entry without one) into one padded block."""
        n = max((p.shape[-2] for p in prompts if p is not None), default=0)
        depth = max((p.shape[0] for p in prompts if p is not None and p.dim() == 3), default=0)
        embeds = torch.zeros(len(prompts), n, width, device=device)
        mask = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
        layers = torch.zeros(len(prompts), max(depth - 1, 0), n, width, device=device) if depth else None
        deep = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            if p is None or not p.shape[-2]:
                continue
            k = p.shape[-2]
            embeds[row, n - k :] = p[0] if p.dim() == 3 else p
            mask[row, n - k :] = 1
            if p.dim() == 3:
                layers[row, :, n - k :] = p[1:]
                deep[row] = True
        return cls(embeds, mask, layers, deep if depth else None)


def prompt_block(prompt: Tensor | RowPrompts, rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The input prompt slots of each sequence, [S, N, d], and their 0/1 mask; `rows` maps sequence to example."""
    if isinstance(prompt, RowPrompts):
        return prompt.embeds[rows].to(dtype), prompt.mask[rows]
    first = prompt[0] if prompt.dim() == 3 else prompt  # a deep prompt's layer 0 is its input prompt
    s, n = rows.shape[0], first.shape[0]
    return first.to(dtype).unsqueeze(0).expand(s, -1, -1), torch.ones(s, n, dtype=torch.long, device=prompt.device)


def insert_prompt(embeds: Tensor, mask: Tensor, prompt: Tensor | RowPrompts, at: int, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Input embeddings [S, T, d] and mask [S, T] with the prompt's slots inserted before position `at`."""
    p, prompt_mask = prompt_block(prompt, rows, embeds.dtype)
    return (torch.cat([embeds[:, :at], p, embeds[:, at:]], dim=1),
            torch.cat([mask[:, :at], prompt_mask, mask[:, at:]], dim=1))


def source_summary(hidden: Tensor, mask: Tensor) -> Tensor:
    """Routing features of one-sequence inputs: [mean state; mean of the first FORMAT_TOKENS; log(1 + tokens)], [B, 2d + 1]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    start = weights[:, :FORMAT_TOKENS]
    first = (hidden[:, :FORMAT_TOKENS] * start).sum(1) / start.sum(1).clamp_min(1)
    return torch.cat([(hidden * weights).sum(1) / weights.sum(1), first, mask.sum(1, keepdim=True).to(hidden.dtype).log1p()], 1).float()


def is_deep(prompt) -> bool:
    """Whether a prompt (a tensor, RowPrompts or None) has prompts past the input layer."""
    if isinstance(prompt, RowPrompts):
        return prompt.layers is not None
    return prompt is not None and prompt.dim() == 3


@contextmanager
def deep_prompt_hooks(layers: nn.ModuleList, prompt, start: int, rows: Tensor):
    """While open, layer l ≥ 1 of `layers` reads a deep prompt's layer l at positions start … start + n - 1
    in place of what layer l - 1 wrote there (a no-op for a shallow prompt); `rows` maps sequence to example."""
    if not is_deep(prompt):
        yield
        return
    depth = prompt.layers.shape[1] + 1 if isinstance(prompt, RowPrompts) else prompt.shape[0]
    if depth != len(layers):
        raise ValueError(f"a deep prompt of {depth} layers on a backbone of {len(layers)}")

    def replace(l: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if isinstance(prompt, RowPrompts):
                p = prompt.layers[rows, l - 1].to(hidden.dtype)
                keep = (prompt.deep[rows].unsqueeze(1) & prompt.mask[rows].bool()).unsqueeze(-1)
                p = torch.where(keep, p, hidden[:, start : start + p.shape[1]])
            else:
                p = prompt[l].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :start], p, hidden[:, start + p.shape[1] :]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return hook

    handles = [layer.register_forward_pre_hook(replace(l), with_kwargs=True) for l, layer in enumerate(layers) if l > 0]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Backbone(ABC):
    """Common part of every family: frozen weights, tokenizer, embedding table, fingerprint."""

    family = ""

    def __init__(self, name: str, model: nn.Module, tokenizer, device: str, attention: str = "auto") -> None:
        self.name = name
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.attention = attention

    @classmethod
    @abstractmethod
    def from_pretrained(cls, name: str, path: str, tokenizer, device: str, attention: str, pooling: str) -> Backbone:
        """Load this family's weights from `path` (a local folder or hub id) and wrap them."""

    @property
    @abstractmethod
    def max_positions(self) -> int:
        """Longest sequence the backbone accepts, prompt included."""

    @abstractmethod
    def new_head(self, task: Task) -> nn.Module | None:
        """A fresh trainable head for `task`, or None where the family needs none."""

    @abstractmethod
    def featurize(self, examples: list[Example], max_tokens: int) -> list[Features]:
        """Tokenise every example once, each text truncated to `max_tokens` (prompt not included)."""

    @abstractmethod
    def collate(self, batch: list[Features]) -> dict[str, Tensor]:
        """Pad a batch of features into tensors on the backbone's device."""

    @abstractmethod
    def loss(self, prompt: Tensor | None, head: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of a collated batch, with `prompt` [n, d] inserted (or none)."""

    @abstractmethod
    def scores(self, prompt: Tensor | RowPrompts | None, head: nn.Module | list[nn.Module] | None, batch: dict[str, Tensor]) -> Tensor:
        """Scores [B, C] of every option of every example, -inf where an example has fewer.

        One prompt [n, d] and one head for a batch of one task; or, for a mixed-task batch, `RowPrompts`
        and one head per example (None where the family has no heads).
        """

    @property
    @abstractmethod
    def prompt_layers(self) -> nn.ModuleList:
        """The layers a prompt's positions pass through (a deep prompt has one slice per layer)."""

    @property
    def depth(self) -> int:
        """How many layers a deep prompt has: one per entry of `prompt_layers`."""
        return len(self.prompt_layers)

    @abstractmethod
    def input_features(self, batch: dict[str, Tensor]) -> Tensor:
        """Each example's features without any prompt, [B, D] fp32: what routing compares (D is the family's)."""

    def use_attention_for(self, bf16: bool) -> None:
        """Pick the attention kernel for this precision (only encoders switch; see EncoderBackbone)."""

    @cached_property
    def native_bf16(self) -> bool:
        """Whether this backbone's device computes bf16 natively: what training's `bf16: auto` picks."""
        return device_bf16(self.device)

    @property
    def width(self) -> int:
        """Embedding width d."""
        return self.embeddings.weight.shape[1]

    @property
    def embeddings(self) -> nn.Embedding:
        """The input word-embedding table."""
        return self.model.get_input_embeddings()

    @cached_property
    def vocab_ids(self) -> Tensor:
        """Ids of ordinary tokens, the pool that vocabulary initialisation samples from."""
        vocab = self.tokenizer.get_vocab()
        special = set(self.tokenizer.all_special_ids)
        ids = [i for t, i in vocab.items() if i not in special and not _NOT_ORDINARY.match(t)]
        return torch.tensor(sorted(i for i in ids if i < self.embeddings.num_embeddings))

    @cached_property
    def embedding_norm(self) -> float:
        """Mean L2 norm of the ordinary tokens' embeddings (the scale the prompt should live at)."""
        return self.embeddings.weight[self.vocab_ids].norm(dim=1).mean().item()

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a text without special tokens (for text initialisation of a prompt)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every weight's name, dtype, shape and bytes: identifies the frozen weights."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()


def source_features(examples: list[Example], sources: list[list[int]], targets: list[list[int]]) -> list[Features]:
    """One source per example and its slice of the flat candidate list `targets` (seq2seq and decoder families)."""
    features, start = [], 0
    for ex, src in zip(examples, sources):
        stop = start + len(ex.candidates)
        features.append(Features(ids=[src], types=[], targets=targets[start:stop], label=ex.label))
        start = stop
    return features


def _pad(seqs: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad `seqs` with `value` into [len(seqs), longest], plus the 0/1 mask of real tokens."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return out, mask
