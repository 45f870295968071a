"""Bank entries as PEFT prompt-tuning adapters, and back.

An exported adapter is what `peft.PeftModel.from_pretrained(base, DIR)` loads: `adapter_config.json`
(peft_type PROMPT_TUNING) and `adapter_model.safetensors` holding `prompt_embeddings` = P′, plus
`continual_rpt.json` (which entry, task and backbone fingerprint it came from). PEFT
puts the virtual tokens in front of the input embeddings, which is where this toolkit puts them on
a seq2seq backbone and on a decoder whose tokenizer adds no BOS token, so there the adapter
answers exactly as the entry does. Elsewhere it would not, and export is refused: an encoder's
prompt goes after [CLS] and its answers come from a per-task head PEFT has no place for; a decoder
whose tokenizer starts every text with BOS has its prompt after BOS. Import is the reverse, for the
same two cases; PEFT itself is not needed for either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from continual_rpt import __version__
from continual_rpt.backbones import Backbone
from continual_rpt.bank import BankError, Entry
from continual_rpt.routing import route_state
from continual_rpt.tasks import Task, TaskData

CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE = "adapter_config.json", "adapter_model.safetensors", "continual_rpt.json"
TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}  # family -> PEFT task type


def exportable(backbone_meta: dict, where: str) -> str:
    """The PEFT task type of an entry's backbone, or a BankError saying why PEFT would answer differently."""
    family = backbone_meta.get("family")
    if family == "encoder":
        raise BankError(f"{where}: an encoder entry cannot be a PEFT prompt-tuning adapter: PEFT puts the virtual tokens "
                        "before [CLS] (this toolkit after it) and has no place for the task's head, so it would answer differently")
    if family == "decoder" and backbone_meta.get("bos", True):
        raise BankError(f"{where}: this decoder's tokenizer starts every text with BOS and the prompt was trained after it; "
                        "PEFT puts the virtual tokens before BOS, so the adapter would answer differently")
    if family not in TASK_TYPES:
        raise BankError(f"{where}: backbone family {family!r} has no PEFT prompt-tuning equivalent")
    return TASK_TYPES[family]


def export_peft(entry: Entry, where: str, out: Path) -> None:
    """Write `entry`'s P′ as a PEFT prompt-tuning adapter folder `out` (refused where PEFT would answer differently)."""
    task_type = exportable(entry.meta.get("backbone", {}), where)
    if entry.prompt is None:
        raise BankError(f"{where}: the entry has no prompt to export")
    if entry.prompt.dim() == 3:
        raise BankError(f"{where}: a deep prompt (one per layer) has no PEFT prompt-tuning equivalent")
    if entry.meta.get("context"):
        raise BankError(f"{where}: a Progressive Prompts entry is answered with earlier entries' prompts too; export those as one")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing was overwritten)")
    n, d = entry.prompt.shape
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": task_type, "num_virtual_tokens": n, "token_dim": d,
        "num_transformer_submodules": 1,  # the prompt enters one stack: the encoder's (seq2seq) or the decoder's
        "num_attention_heads": None, "num_layers": None,  # PEFT reads them from the base model's config
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "base_model_name_or_path": entry.meta["backbone"].get("name"), "revision": None, "inference_mode": True,
    }
    provenance = {"task": entry.meta.get("task"), "name": entry.meta.get("name"), "method": entry.meta.get("method"),
                  "backbone_fingerprint": entry.meta["backbone"].get("fingerprint"), "continual_rpt": __version__}
    out.mkdir(parents=True)
    save_file({"prompt_embeddings": entry.prompt.float().contiguous()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")  # PEFT reads neither this nor anything else here


def read_peft(folder: Path) -> tuple[dict, torch.Tensor]:
    """A PEFT prompt-tuning adapter's config and its virtual tokens [n, d]; anything else is refused, naming what it is."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise BankError(f"{config_path}: not a readable PEFT adapter config ({err})") from err
    kind = config.get("peft_type")
    if kind != "PROMPT_TUNING":
        raise BankError(f"{config_path}: peft_type {kind!r} is not a prompt-tuning adapter (PROMPT_TUNING); "
                        "only soft prompts can become bank entries")
    if config.get("task_type") not in TASK_TYPES.values():
        raise BankError(f"{config_path}: task_type {config.get('task_type')!r}: expected one of {', '.join(TASK_TYPES.values())}")
    if not weights_path.is_file():
        raise BankError(f"{weights_path}: not found (only safetensors adapters are read, never pickles)")
    try:
        embeddings = load_file(weights_path)["prompt_embeddings"]
    except Exception as err:  # a truncated file, or no such tensor
        raise BankError(f"{weights_path}: no readable tensor 'prompt_embeddings' ({err})") from err
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or embeddings.dim() != 2 or embeddings.shape[0] < n:
        raise BankError(f"{weights_path}: prompt_embeddings of shape {tuple(embeddings.shape)} does not hold num_virtual_tokens={n!r}")
    return config, embeddings[:n].float().clone()  # PEFT uses the first n rows for the one stack it prompts


def import_peft(folder: Path, task: Task, name: str, backbone: Backbone, data: TaskData | None, max_length: int = 256) -> Entry:
    """A bank entry from a PEFT prompt-tuning adapter trained on `backbone` (its route state from `data`, if given)."""
    config, prompt = read_peft(folder)
    where = str(folder / CONFIG_FILE)
    backbone_meta = {"name": backbone.name, "family": backbone.family, "width": backbone.width,
                     "fingerprint": backbone.fingerprint, "pooling": None, "bos": getattr(backbone, "bos", None)}
    if TASK_TYPES.get(backbone.family) != config["task_type"]:
        raise BankError(f"{where}: a {config['task_type']} adapter, but backbone {backbone.name!r} is {backbone.family}")
    exportable(backbone_meta, where)  # the same cases, the other way round
    provenance = folder / PROVENANCE_FILE
    stored = json.loads(provenance.read_text()).get("backbone_fingerprint") if provenance.is_file() else None
    if stored and stored != backbone.fingerprint:
        raise BankError(f"{provenance}: the adapter was trained on other weights (fingerprint {stored[:12]}…) than "
                        f"backbone {backbone.name!r} ({backbone.fingerprint[:12]}…)")
    if prompt.shape[1] != backbone.width:
        raise BankError(f"{where}: token_dim {prompt.shape[1]} is not backbone {backbone.name!r}'s width {backbone.width}")
    meta = {
        "library_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "name": name, "task": task.name,
        "custom": None, "kind": task.kind, "label_names": list(task.label_names), "backbone": backbone_meta,
        "method": "peft", "prompt_tokens": prompt.shape[0], "dtype": "float32",
        "data_files": data.files if data else {}, "skipped_rows": data.skipped if data else {},
    }
    route = None
    if data is not None:
        route = route_state(backbone, data.train, data.dev, prompt.to(backbone.device), None, max_length, seed=0, bf16=False)
    # Made in fp32 as far as this toolkit knows: recorded, so that predict, routing and the server score it in fp32.
    config_doc = {"imported_from": str(folder), "adapter_config": config, "train": {"max_length": max_length, "bf16": False}}
    return Entry(prompt, None, meta, config_doc, {"name": name}, route)
