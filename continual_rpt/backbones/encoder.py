"""Encoder family (BERT-style): the prompt goes in right after [CLS]; a small head per task reads
the pooled output; choice tasks score every (context, choice) pair with a one-logit head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual_rpt.backbones.base import FORMAT_TOKENS, Backbone, Features, RowPrompts, _pad, deep_prompt_hooks, insert_prompt
from continual_rpt.tasks import Example, Task

POOLINGS = ("cls", "mean")


class EncoderBackbone(Backbone):
    """BERT-style encoder: prompt after [CLS], pooled output into a per-task head."""

    family = "encoder"

    def __init__(self, name: str, model: nn.Module, tokenizer, device: str, attention: str, pooling: str) -> None:
        super().__init__(name, model, tokenizer, device, attention)
        self.pooling = pooling

    @classmethod
    def from_pretrained(cls, name: str, path: str, tokenizer, device: str, attention: str, pooling: str) -> EncoderBackbone:
        """The bare encoder (no task head) with SDPA attention unless eager is asked for."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, use_safetensors=True, attn_implementation="eager" if attention == "eager" else "sdpa")
        return cls(name, model, tokenizer, device, attention, pooling)

    def use_attention_for(self, bf16: bool) -> None:
        """Under `auto`, the faster kernel: on a CPU, SDPA's bf16 backward is slow and eager is not (performance.md)."""
        if self.attention == "auto":
            fast = "eager" if bf16 and self.device.type == "cpu" else "sdpa"
            if self.model.config._attn_implementation != fast:
                self.model.set_attn_implementation(fast)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings allow, prompt included."""
        # RoBERTa-style embeddings number positions from padding_idx + 1: the slots below are never used.
        padding_idx = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
        return self.model.config.max_position_embeddings - (0 if padding_idx is None else padding_idx + 1)

    @property
    def prompt_layers(self) -> nn.ModuleList:
        """The encoder's transformer layers."""
        return self.model.encoder.layer

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

    def encode(self, prompt: Tensor | RowPrompts | None, batch: dict[str, Tensor]) -> Tensor:
        """Pooled output [S, d] for the S padded sequences, with the prompt after [CLS]."""
        return self._pool(*self._hidden(prompt, batch))

    def _hidden(self, prompt: Tensor | RowPrompts | None, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Last hidden states [S, L, d] with the prompt after [CLS], and their attention mask [S, L]."""
        embeds = self.embeddings(batch["input_ids"])  # [S, T, d]
        mask, types = batch["attention_mask"], batch["token_type_ids"]
        positions = None
        if prompt is not None:
            embeds, mask = insert_prompt(embeds, mask, prompt, 1, batch["rows"])  # [S, 1 + n + T - 1, d]
            n = embeds.shape[1] - types.shape[1]
            prompt_mask = mask[:, 1 : 1 + n]
            types = torch.cat([types[:, :1], torch.zeros_like(prompt_mask), types[:, 1:]], dim=1)
            if isinstance(prompt, RowPrompts):  # number positions as if the masked prompt slots were not there
                kept = torch.ones_like(mask)
                kept[:, 1 : 1 + n] = prompt_mask
                padding_idx = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
                positions = kept.cumsum(1) - 1 + (0 if padding_idx is None else padding_idx + 1)
        with deep_prompt_hooks(self.prompt_layers, prompt, 1, batch["rows"]):  # a deep prompt again after [CLS] at every layer
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, position_ids=positions).last_hidden_state
        return hidden, mask

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def input_features(self, batch: dict[str, Tensor]) -> Tensor:
        """What an input looks like, without a prompt: [pooled output; mean of its first FORMAT_TOKENS tokens;
        log(1 + tokens) of each segment], [B, 2d + 2], averaged over an example's pairs (one per choice).

        The pooled output says what the text is about; the first tokens and the lengths say what form
        it takes (a `word:` prefix, a question, a review's length), which tells tasks on one topic apart.
        """
        hidden, mask = self._hidden(None, batch)
        pooled = self._pool(hidden, mask).float()
        start = mask[:, 1 : 1 + FORMAT_TOKENS].unsqueeze(-1).to(hidden.dtype)  # the first tokens after [CLS]
        first = ((hidden[:, 1 : 1 + FORMAT_TOKENS] * start).sum(1) / start.sum(1).clamp_min(1)).float()
        second = batch["token_type_ids"].bool() & mask.bool()
        lengths = torch.stack([(mask.bool() & ~second).sum(1), second.sum(1)], 1).float().log1p()
        x = torch.cat([pooled, first, lengths], 1)
        rows, n = batch["rows"], int(batch["labels"].shape[0])
        sums = x.new_zeros(n, x.shape[1]).index_add_(0, rows, x)
        return sums / torch.bincount(rows, minlength=n).unsqueeze(1).to(sums.dtype)

    def scores(self, prompt: Tensor | RowPrompts | None, head: nn.Module | list[nn.Module], batch: dict[str, Tensor]) -> Tensor:
        """Scores [B, C]: label logits, or choice logits with -inf where an example has fewer choices."""
        pooled = self.encode(prompt, batch)  # [S, d]
        if isinstance(head, list):
            return self._scores_per_head(pooled, head, batch)
        logits = head(pooled).float()  # [S, outputs]
        if logits.shape[1] > 1:  # classification: one sequence per example
            return logits
        n_rows = int(batch["labels"].shape[0])
        n_slots = int(batch["slots"].max()) + 1
        packed = logits.new_full((n_rows, n_slots), float("-inf"))
        packed[batch["rows"], batch["slots"]] = logits[:, 0]
        return packed

    def _scores_per_head(self, pooled: Tensor, heads: list[nn.Module], batch: dict[str, Tensor]) -> Tensor:
        """A mixed-task batch's scores: each example's sequences read by its own task's head."""
        rows, slots = batch["rows"], batch["slots"]
        width = max(max(h.out_features for h in heads), int(slots.max()) + 1)
        packed = pooled.new_full((len(heads), width), float("-inf"), dtype=torch.float32)
        for head in {id(h): h for h in heads}.values():
            mine = torch.tensor([heads[int(r)] is head for r in rows], device=rows.device)
            logits = head(pooled[mine]).float()
            if logits.shape[1] > 1:
                packed[rows[mine], : logits.shape[1]] = logits
            else:
                packed[rows[mine], slots[mine]] = logits[:, 0]
        return packed

    def loss(self, prompt: Tensor | None, head: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of the gold label or gold choice."""
        return F.cross_entropy(self.scores(prompt, head, batch), batch["labels"])
