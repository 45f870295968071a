"""The prompt bank: one inference-only entry per task, keyed by task name.

An entry is a folder: `prompt.safetensors` (key `prompt`, [n, d] fp32), `head.safetensors` where the
backbone has a head, `entry.json` (what the entry is: task, labels, backbone fingerprint and width,
data checksums, version), `config.json` (the resolved configuration that trained it) and
`metrics.json` (its scores, sizes and timings). Nothing else is read, so loading never runs code.

A bank is a folder of entries plus `bank.json`, the index: entry names in the order they were
added, with the sha256 of every file. An entry is written to a temporary folder, fsynced and
renamed into place, and only then listed in the index (itself replaced atomically), so a reader
never sees a half-written entry. A lock file keeps two writers apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual_rpt.evaluation import predict
from continual_rpt.tasks import Example, Task, custom_config_from_dict, custom_task, get_task, read_custom_examples, read_jsonl

PROMPT_FILE, HEAD_FILE = "prompt.safetensors", "head.safetensors"
META_FILE, CONFIG_FILE, METRICS_FILE = "entry.json", "config.json", "metrics.json"
ENTRY_FILES = frozenset({PROMPT_FILE, HEAD_FILE, META_FILE, CONFIG_FILE, METRICS_FILE})
INDEX_FILE, LOCK_FILE = "bank.json", ".lock"
BANK_FORMAT = "continual-rpt-bank/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BankError(ValueError):
    """A bank or entry that cannot be used as it is; the message names the file or field."""


@dataclass
class Entry:
    """One task's inference-only artifact: P′, the head weights, metadata, config and metrics."""

    prompt: Tensor | None
    head: dict[str, Tensor] | None
    meta: dict
    config: dict
    metrics: dict


def check_name(name: str) -> str:
    """A task name usable as a folder name: letters, digits and `_.+-`, no path separators or `..`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BankError(f"task name {name!r}: use letters, digits and _ . + - only (no path separators, no '..')")
    return name


def write_json(path: Path, data: dict) -> None:
    """Write sorted, indented JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replace_json(path: Path, data: dict) -> None:
    """Atomically replace `path` with `data` as JSON (write a sibling, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_entry(folder: str | Path, entry: Entry) -> dict[str, str]:
    """Write `entry` to `folder` atomically (complete, or not there at all); return its files' sha256."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if entry.prompt is not None and not torch.isfinite(entry.prompt).all():
        raise BankError(f"{folder.name}: refusing to store a prompt with non-finite values")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if entry.prompt is not None:
            save_file({"prompt": entry.prompt.detach().float().cpu().contiguous()}, tmp / PROMPT_FILE)
        if entry.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in entry.head.items()}, tmp / HEAD_FILE)
        write_json(tmp / META_FILE, entry.meta)
        write_json(tmp / CONFIG_FILE, entry.config)
        write_json(tmp / METRICS_FILE, entry.metrics)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        checksums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bank is shared like any other folder
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checksums


def load_entry(folder: str | Path, checksums: dict[str, str] | None = None) -> Entry:
    """Read an entry folder (safetensors and JSON only), verifying file checksums when given."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise BankError(f"{folder / META_FILE}: not found; {folder} is not a bank entry")
    present = {p.name for p in folder.iterdir()}
    unexpected = sorted(present - ENTRY_FILES)
    if unexpected:  # e.g. a pickle someone dropped in: refused, never opened
        raise BankError(f"{folder / unexpected[0]}: unexpected file in a bank entry; only safetensors and JSON are read "
                        f"({', '.join(sorted(ENTRY_FILES))})")
    if checksums is not None:
        if present != set(checksums):
            odd = sorted(present ^ set(checksums))[0]
            raise BankError(f"{folder / odd}: the entry's files differ from those its bank index lists")
        for name, digest in checksums.items():
            if _sha256(folder / name) != digest:
                raise BankError(f"{folder / name}: changed since it was stored (checksum mismatch)")
    docs = {}
    for name in (META_FILE, CONFIG_FILE, METRICS_FILE):
        try:
            docs[name] = json.loads((folder / name).read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise BankError(f"{folder / name}: unreadable JSON ({err})") from err
        if not isinstance(docs[name], dict):
            raise BankError(f"{folder / name}: must hold a JSON object, not {type(docs[name]).__name__}")
    tensors = {}
    for name in (PROMPT_FILE, HEAD_FILE):
        if (folder / name).is_file():
            try:
                tensors[name] = load_file(folder / name)
            except Exception as err:  # safetensors raises its own error types for truncated files
                raise BankError(f"{folder / name}: not a valid safetensors file ({err})") from err
    prompt = tensors[PROMPT_FILE].get("prompt") if PROMPT_FILE in tensors else None
    if PROMPT_FILE in tensors and prompt is None:
        raise BankError(f"{folder / PROMPT_FILE}: has no tensor named 'prompt'")
    return Entry(prompt, tensors.get(HEAD_FILE), docs[META_FILE], docs[CONFIG_FILE], docs[METRICS_FILE])


class PromptBank:
    """A folder of collapsed prompts keyed by task; old entries are never changed by new ones."""

    def __init__(self, path: Path, index: dict) -> None:
        self.path = path
        self._index = index

    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> PromptBank:
        """Open the bank at `path`; with create=True an empty one is made where none exists."""
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            if not create:
                raise BankError(f"{index_path}: not found; {path} is not a prompt bank")
            path.mkdir(parents=True, exist_ok=True)
            with cls._locked(path):
                if not index_path.is_file():
                    replace_json(index_path, {"format": BANK_FORMAT, "entries": []})
        return cls(path, cls._read_index(index_path))

    @staticmethod
    def _read_index(index_path: Path) -> dict:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise BankError(f"{index_path}: unreadable bank index ({err})") from err
        if not isinstance(index, dict) or index.get("format") != BANK_FORMAT or not isinstance(index.get("entries"), list):
            raise BankError(f"{index_path}: not a {BANK_FORMAT} index (fields 'format' and 'entries')")
        for i, item in enumerate(index["entries"]):
            files = item.get("files") if isinstance(item, dict) else None
            if not isinstance(files, dict) or META_FILE not in files:
                raise BankError(f"{index_path}: entries[{i}] must be an object with 'name' and 'files' (listing {META_FILE})")
            for name, digest in files.items():
                if name not in ENTRY_FILES or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                    raise BankError(f"{index_path}: entries[{i}].files: {name!r} is not an entry file with a sha256")
            try:
                check_name(item.get("name"))
            except BankError as err:
                raise BankError(f"{index_path}: entries[{i}].name: {err}") from None
        return index

    @staticmethod
    @contextmanager
    def _locked(path: Path):
        with open(path / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def refresh(self) -> None:
        """Re-read the index (another process may have added entries)."""
        self._index = self._read_index(self.path / INDEX_FILE)

    def tasks(self) -> list[str]:
        """Entry names in the order they were added."""
        return [item["name"] for item in self._index["entries"]]

    def __contains__(self, name: str) -> bool:
        return name in self.tasks()

    def get(self, name: str) -> Entry:
        """The entry stored for `name`, checked against the index's checksums."""
        for item in self._index["entries"]:
            if item["name"] == name:
                return load_entry(self.path / check_name(name), item["files"])
        raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")

    def _remove_leftovers(self) -> None:
        """Temporary folders and index files of writers that were killed (call with the lock held)."""
        for path in self.path.iterdir():
            if path.name.startswith(".") and path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def add(self, name: str, entry: Entry) -> None:
        """Store a new entry; an existing name is refused, so nothing stored is ever overwritten."""
        check_name(name)
        with self._locked(self.path):
            self.refresh()
            if name in self:
                raise BankError(f"{self.path}: already has an entry for {name!r}; entries are never overwritten")
            self._remove_leftovers()
            folder = self.path / name
            if folder.exists():  # left over by a writer killed before it updated the index
                shutil.rmtree(folder)
            checksums = save_entry(folder, entry)
            index = {**self._index, "entries": [*self._index["entries"], {"name": name, "files": checksums}]}
            replace_json(self.path / INDEX_FILE, index)
            self._index = index

    def load_for(self, name: str, backbone) -> tuple[Task, Tensor | None, nn.Module | None, Entry]:
        """Task, prompt P′ and head of an entry, on `backbone`, after checking it is the backbone it was trained on."""
        entry = self.get(name)
        where = self.path / name / META_FILE
        stored = entry.meta.get("backbone")
        if not (isinstance(stored, dict) and isinstance(stored.get("fingerprint"), str) and isinstance(stored.get("width"), int)):
            raise BankError(f"{where}: field 'backbone' must hold 'fingerprint' (a string) and 'width' (an integer)")
        if stored["width"] != backbone.width:
            raise BankError(f"{where}: entry has width {stored['width']}, backbone {backbone.name!r} has {backbone.width}")
        if stored["fingerprint"] != backbone.fingerprint:
            raise BankError(f"{where}: entry was trained on backbone {stored.get('name')!r} with other weights "
                            f"(fingerprint {stored['fingerprint'][:12]}…, this one {backbone.fingerprint[:12]}…)")
        task = task_from_meta(entry.meta, where)
        prompt = entry.prompt
        if prompt is not None and (prompt.dim() != 2 or prompt.shape[1] != backbone.width):
            raise BankError(f"{self.path / name / PROMPT_FILE}: prompt has shape {tuple(prompt.shape)}, expected (n, {backbone.width})")
        context = entry.meta.get("context") or []
        if not isinstance(context, list) or name in context or not all(c in self.tasks() for c in context):
            raise BankError(f"{where}: field 'context' must list other entries of this bank, got {context!r}")
        if context:  # Progressive Prompts: the entry's own prompt, then the earlier tasks' prompts
            prompt = torch.cat([prompt, *(self.get(other).prompt for other in context)])
        prompt = prompt.to(backbone.device) if prompt is not None else None
        head = None
        if entry.head is not None:
            head = backbone.new_head(task)
            try:
                head.load_state_dict(entry.head)
            except RuntimeError as err:
                raise BankError(f"{self.path / name / HEAD_FILE}: does not fit this backbone's head ({err})") from err
        return task, prompt, head, entry

    def predict(self, name: str, examples: list[Example], backbone) -> list[int]:
        """Predicted label or choice index of every example with task `name`'s stored prompt."""
        task, prompt, head, entry = self.load_for(name, backbone)
        train = entry.config.get("train", {})  # predict as the entry was evaluated when it was trained
        return predict(backbone, prompt, head, examples, max_length=train.get("max_length", 256), bf16=train.get("bf16", True))


def task_from_meta(meta: dict, where: Path | str) -> Task:
    """Rebuild an entry's task: a SuperGLUE task by name, or a custom task from its stored definition."""
    try:
        if meta.get("custom"):
            return custom_task(custom_config_from_dict(meta["custom"], "custom"))
        if not isinstance(meta.get("task"), str):
            raise ValueError("field 'task' must name the task")
        return get_task(meta["task"])
    except ValueError as err:
        raise BankError(f"{where}: {err}") from None


def read_examples(meta: dict, path: str | Path) -> list[Example]:
    """An entry's task examples from a file in the task's own format; labels are optional."""
    if meta.get("custom"):
        return read_custom_examples(custom_config_from_dict(meta["custom"], "entry custom"), path)
    return read_jsonl(task_from_meta(meta, path), path)
