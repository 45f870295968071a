"""Bank entries: a collapsed prompt P′ (and head) in safetensors, with JSON metadata.

An entry is a folder: `prompt.safetensors` (key `prompt`, [n, d]), `head.safetensors` where the
backbone has a head, `entry.json` (what the entry is: task, labels, backbone fingerprint, width,
data checksums, version), `config.json` (the resolved configuration that trained it) and
`metrics.json` (its scores, sizes and timings). Nothing else is read, so loading never runs code.
Writes go to a temporary folder that is renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

PROMPT_FILE, HEAD_FILE = "prompt.safetensors", "head.safetensors"
META_FILE, CONFIG_FILE, METRICS_FILE = "entry.json", "config.json", "metrics.json"


@dataclass
class Entry:
    """One task's inference-only artifact: P′, the head weights, metadata, config and metrics."""

    prompt: Tensor | None
    head: dict[str, Tensor] | None
    meta: dict
    config: dict
    metrics: dict


def write_json(path: Path, data: dict) -> None:
    """Write sorted, indented JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_entry(folder: str | Path, entry: Entry) -> Path:
    """Write `entry` to `folder` atomically: complete, or not there at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if entry.prompt is not None:
            if not torch.isfinite(entry.prompt).all():
                raise ValueError("refusing to store a prompt with non-finite values")
            save_file({"prompt": entry.prompt.detach().cpu().contiguous()}, tmp / PROMPT_FILE)
        if entry.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in entry.head.items()}, tmp / HEAD_FILE)
        write_json(tmp / META_FILE, entry.meta)
        write_json(tmp / CONFIG_FILE, entry.config)
        write_json(tmp / METRICS_FILE, entry.metrics)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_entry(folder: str | Path) -> Entry:
    """Read an entry folder (safetensors and JSON only)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; {folder} is not a bank entry")
    meta, config, metrics = (json.loads((folder / name).read_text()) for name in (META_FILE, CONFIG_FILE, METRICS_FILE))
    prompt = load_file(folder / PROMPT_FILE)["prompt"] if (folder / PROMPT_FILE).is_file() else None
    head = load_file(folder / HEAD_FILE) if (folder / HEAD_FILE).is_file() else None
    return Entry(prompt=prompt, head=head, meta=meta, config=config, metrics=metrics)
