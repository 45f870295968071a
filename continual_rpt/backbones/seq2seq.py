"""Seq2seq family (T5, T5 v1.1, Flan-T5, mT5, UMT5): the prompt goes in front of the encoder
input; training is teacher-forced on the gold target; prediction ranks the candidate strings by
log-likelihood. No per-task head: the label words are the decoder's targets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from continual_rpt.backbones.base import (Backbone, Features, RowPrompts, _pad, deep_prompt_hooks, insert_prompt, source_features,
                                         source_summary)
from continual_rpt.tasks import Example, Task


class Seq2SeqBackbone(Backbone):
    """T5-style encoder-decoder: prompt before the source; targets are label words or choices."""

    family = "seq2seq"

    @classmethod
    def from_pretrained(cls, name: str, path: str, tokenizer, device: str, attention: str, pooling: str) -> Seq2SeqBackbone:
        """The encoder-decoder with its LM head; `pooling` does not apply (no pooled output)."""
        from transformers import AutoModelForSeq2SeqLM

        kernel = {} if attention == "auto" else {"attn_implementation": attention}
        model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True, **kernel)
        return cls(name, model, tokenizer, device, attention)

    @property
    def max_positions(self) -> int:
        """T5 uses relative positions; the limit is the training budget, not the architecture."""
        return 10**6

    @property
    def prompt_layers(self) -> nn.ModuleList:
        """The encoder's blocks: the prompt is part of the source, which only the encoder reads."""
        return self.model.get_encoder().block

    def _deep(self, prompt, batch: dict[str, Tensor]):
        return deep_prompt_hooks(self.prompt_layers, prompt, 0, torch.arange(batch["input_ids"].shape[0], device=self.device))

    def new_head(self, task: Task) -> None:
        """None: the decoder scores the label words itself."""
        return None

    def featurize(self, examples: list[Example], max_tokens: int) -> list[Features]:
        """Tokenise each source (truncated to `max_tokens`) and every candidate target once."""
        sources = self.tokenizer([ex.source for ex in examples], truncation=True, max_length=max_tokens)["input_ids"]
        flat = [c for ex in examples for c in ex.candidates]
        targets = self.tokenizer(flat, truncation=True, max_length=max_tokens)["input_ids"] if flat else []
        return source_features(examples, sources, targets)

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

    def _inputs(self, prompt: Tensor | RowPrompts | None, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        # T5's positions are relative, so masked prompt slots in front of a shorter prompt change nothing.
        embeds, mask = self.embeddings(batch["input_ids"]), batch["attention_mask"]  # [B, T, d]
        if prompt is None:
            return embeds, mask
        return insert_prompt(embeds, mask, prompt, 0, torch.arange(embeds.shape[0], device=embeds.device))  # [B, n + T, d]

    def input_features(self, batch: dict[str, Tensor]) -> Tensor:
        """What a source looks like, without a prompt: [mean encoder output; mean of its first FORMAT_TOKENS
        tokens; log(1 + tokens)], [B, 2d + 1] (as the encoder family's, with one segment)."""
        mask = batch["attention_mask"]
        return source_summary(self.model.get_encoder()(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state, mask)

    def loss(self, prompt: Tensor | None, head: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """Teacher-forced token cross-entropy of the gold target."""
        embeds, mask = self._inputs(prompt, batch)
        with self._deep(prompt, batch):
            return self.model(inputs_embeds=embeds, attention_mask=mask, labels=batch["gold_labels"]).loss

    def scores(self, prompt: Tensor | RowPrompts | None, head: nn.Module | list | None, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-likelihood of every candidate, [B, C], -inf where an example has fewer."""
        embeds, mask = self._inputs(prompt, batch)
        with self._deep(prompt, batch):
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
