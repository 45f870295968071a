"""Decoder-only family (GPT-2, Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3, OLMo 2): the prompt goes in front of the input,
after the BOS token where the tokenizer adds one; training is teacher-forced on the gold candidate;
prediction ranks the candidates (label words or choices) by summed log-likelihood. The context runs
once per example and its key/value cache is reused for every candidate: never one full forward per
candidate. Sequences are right-padded; position ids count real tokens only, so padding (and the
masked slots of a shorter prompt in a mixed-task batch) moves no position."""

from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor, nn

from continual_rpt.backbones.base import (Backbone, Features, RowPrompts, _pad, deep_prompt_hooks, insert_prompt, source_features,
                                         source_summary)
from continual_rpt.tasks import Example, Task

log = logging.getLogger(__name__)


class DecoderBackbone(Backbone):
    """Causal LM: [BOS] P′ context, then each candidate continued from the context's cache."""

    family = "decoder"

    def __init__(self, name: str, model: nn.Module, tokenizer, device: str, attention: str = "auto") -> None:
        if tokenizer.pad_token_id is None:  # GPT-2, Llama: padding is masked, any id will do; the eos token is the usual one
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
            log.warning("backbone %s: the tokenizer has no pad token; using %r (padding is masked, so it is never read)",
                        name, tokenizer.pad_token)
        super().__init__(name, model, tokenizer, device, attention)
        # newer transformers name the key/value cache argument `cache` (`past_key_values` is deprecated), older ones only the latter
        self.cache_argument = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"
        bos = tokenizer.bos_token_id
        self.bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]  # the tokenizer starts every text with BOS

    @classmethod
    def from_pretrained(cls, name: str, path: str, tokenizer, device: str, attention: str, pooling: str) -> DecoderBackbone:
        """The causal LM with its LM head; `pooling` does not apply."""
        from transformers import AutoModelForCausalLM

        kernel = {} if attention == "auto" else {"attn_implementation": attention}
        return cls(name, AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kernel), tokenizer, device, attention)

    @property
    def sliding_window(self) -> int | None:
        """Mistral's attention window (None where the model attends to every earlier position)."""
        config = self.model.config
        if not getattr(config, "use_sliding_window", True):  # Qwen2 names a window but does not use it by default
            return None
        return getattr(config, "sliding_window", None)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings (or the RoPE training length) allow, prompt included.

        A sliding window caps it: the window is counted in padded positions, so inside it padded and
        unpadded rows attend alike, and past it they would not.
        """
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or config.n_positions
        return min(positions, self.sliding_window or positions)

    @property
    def prompt_layers(self) -> nn.ModuleList:
        """The decoder's blocks (GPT-2's `h`, Llama-style `layers`)."""
        body = self.model.base_model
        return body.layers if hasattr(body, "layers") else body.h

    def new_head(self, task: Task) -> None:
        """None: the LM head scores the candidates itself."""
        return None

    def featurize(self, examples: list[Example], max_tokens: int) -> list[Features]:
        """Tokenise each source (truncated to `max_tokens`) and every candidate, as a continuation after a space."""
        sources = self.tokenizer([ex.source for ex in examples], truncation=True, max_length=max_tokens)["input_ids"]
        flat = [(ex, c) for ex in examples for c in ex.candidates]
        targets = self.tokenizer([" " + c for _, c in flat], add_special_tokens=False)["input_ids"] if flat else []
        for (ex, c), ids in zip(flat, targets):
            if not ids:
                raise ValueError(f"example {ex.uid!r}: candidate {c!r} tokenizes to nothing with {self.name}'s tokenizer")
        return source_features(examples, sources, targets)

    def collate(self, batch: list[Features]) -> dict[str, Tensor]:
        """Right-pad the contexts and every candidate; remember which example and slot each candidate scores."""
        pad = self.tokenizer.pad_token_id
        input_ids, mask = _pad([f.ids[0] for f in batch], pad)
        cand_ids, cand_mask = _pad([t for f in batch for t in f.targets], pad)
        rows = torch.tensor([i for i, f in enumerate(batch) for _ in f.targets])
        slots = torch.tensor([j for f in batch for j in range(len(f.targets))])
        labels = torch.tensor([f.label for f in batch])
        out = {"input_ids": input_ids, "attention_mask": mask, "cand_ids": cand_ids, "cand_mask": cand_mask,
               "rows": rows, "slots": slots, "labels": labels}
        return {k: v.to(self.device) for k, v in out.items()}

    def _context(self, prompt: Tensor | RowPrompts | None, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Input embeddings [B, L, d] with the prompt after BOS (or first), and their mask [B, L]."""
        embeds, mask = self.embeddings(batch["input_ids"]), batch["attention_mask"]
        if prompt is None:
            return embeds, mask
        return insert_prompt(embeds, mask, prompt, 1 if self.bos else 0, torch.arange(embeds.shape[0], device=embeds.device))

    def _candidate_logp(self, prompt: Tensor | RowPrompts | None, batch: dict[str, Tensor], gold_only: bool = False) -> tuple[Tensor, Tensor]:
        """log p of every candidate token given its example's context, [C, T_c] (0 at padding), and the candidates' index.

        `gold_only` continues each context with its gold candidate only (training needs no other).
        """
        embeds, mask = self._context(prompt, batch)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        every = torch.arange(mask.shape[0], device=mask.device)
        with deep_prompt_hooks(self.prompt_layers, prompt, 1 if self.bos else 0, every):  # the context pass only: the
            # candidates then read the deep prompt's keys and values from the cache
            out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        lm_head = self.model.get_output_embeddings()
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # the last real token of each row
        first = lm_head(out.last_hidden_state[torch.arange(mask.shape[0]), last]).float().log_softmax(-1)  # [B, V]
        keep = torch.arange(batch["rows"].shape[0], device=mask.device)
        if gold_only:
            keep = keep[batch["slots"] == batch["labels"][batch["rows"]]]
        rows, cand, cand_mask = batch["rows"][keep], batch["cand_ids"][keep], batch["cand_mask"][keep]
        window = self.sliding_window
        if window is not None and mask.shape[1] + cand.shape[1] > window:
            raise ValueError(f"backbone {self.name}: {mask.shape[1]} context positions (prompt included) and {cand.shape[1]} "
                             f"candidate tokens exceed its sliding attention window of {window}, which would cut padded rows "
                             "elsewhere than unpadded ones; lower max_length")
        cache = out.past_key_values
        cache.reorder_cache(rows)  # one copy of its example's context per candidate
        follow = self.model.base_model(
            input_ids=cand, attention_mask=torch.cat([mask[rows], cand_mask], dim=1), **{self.cache_argument: cache},
            position_ids=mask.sum(1)[rows].unsqueeze(1) + torch.arange(cand.shape[1], device=cand.device), use_cache=True,
        ).last_hidden_state  # [C_total, T_c, d]
        # token 0 is predicted by the context's last position, token k by candidate position k - 1
        later = lm_head(follow[:, :-1]).float().log_softmax(-1).gather(-1, cand[:, 1:].unsqueeze(-1)).squeeze(-1)
        logp = torch.cat([first[rows].gather(1, cand[:, :1]), later], dim=1)
        return logp * cand_mask, keep

    def scores(self, prompt: Tensor | RowPrompts | None, head: nn.Module | list | None, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-likelihood of every candidate, [B, C], -inf where an example has fewer."""
        totals = self._candidate_logp(prompt, batch)[0].sum(1)
        n_rows, n_slots = int(batch["labels"].shape[0]), int(batch["slots"].max()) + 1
        packed = totals.new_full((n_rows, n_slots), float("-inf"))
        packed[batch["rows"], batch["slots"]] = totals
        return packed

    def loss(self, prompt: Tensor | None, head: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """Teacher-forced token cross-entropy of the gold candidate."""
        logp, gold = self._candidate_logp(prompt, batch, gold_only=True)
        return -logp.sum() / batch["cand_mask"][gold].sum()

    def input_features(self, batch: dict[str, Tensor]) -> Tensor:
        """What a context looks like, without a prompt: [mean hidden state; mean of its first FORMAT_TOKENS
        tokens; log(1 + tokens)], [B, 2d + 1] (as the seq2seq family's)."""
        mask = batch["attention_mask"]
        return source_summary(self.model.base_model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state, mask)

