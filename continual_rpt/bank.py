"""The prompt bank: one inference-only entry per task, keyed by task name.

An entry is a folder: `prompt.safetensors` (key `prompt`, [n, d] fp32; [L, n, d] for a deep prompt), `head.safetensors` where the
backbone has a head, `route.safetensors` (what routing by input needs, see `continual_rpt.routing`;
absent in entries made before routing existed), `entry.json` (what the entry is: task, labels, backbone fingerprint and width,
data checksums, version), `config.json` (the resolved configuration that trained it) and
`metrics.json` (its scores, sizes and timings). Nothing else is read, so loading never runs code.

An entry is saved and loaded like a PEFT adapter: `entry.save_pretrained(folder)`,
`Entry.from_pretrained(folder)`. This module is storage only: what to do with an entry
(prediction, Progressive Prompts' context) is in `continual_rpt.evaluation`, and rebuilding its
task from the metadata is `continual_rpt.tasks.task_from_meta`.

A bank is a folder of entries plus `bank.json`, the index: entry names in the order they were
added, with the sha256 of every file. An entry is written to a temporary folder, fsynced and
renamed into place, and only then listed in the index (itself replaced atomically), so a reader
never sees a half-written entry. A lock file keeps two writers apart. The one thing ever added to
a stored entry is route state it lacks (`add_route`, for entries made before routing existed):
the file lands beside the others and counts only once the index lists it, so a writer killed in
between leaves the entry as it was.
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
from torch import Tensor

from continual_rpt.atomic import fsync_dir, replace_json, write_json
from continual_rpt.faults import kill_point

PROMPT_FILE, HEAD_FILE, ROUTE_FILE = "prompt.safetensors", "head.safetensors", "route.safetensors"
META_FILE, CONFIG_FILE, METRICS_FILE = "entry.json", "config.json", "metrics.json"
ENTRY_FILES = frozenset({PROMPT_FILE, HEAD_FILE, ROUTE_FILE, META_FILE, CONFIG_FILE, METRICS_FILE})
INDEX_FILE, LOCK_FILE = "bank.json", ".lock"
BANK_FORMAT = "continual-rpt-bank/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BankError(ValueError):
    """A bank or entry that cannot be used as it is; the message names the file or field."""


def check_name(name: str) -> str:
    """A task name usable as a folder name: letters, digits and `_.+-`, no path separators or `..`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BankError(f"task name {name!r}: use letters, digits and _ . + - only (no path separators, no '..')")
    return name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Entry:
    """One task's inference-only artifact: P′, the head weights, metadata, config and metrics."""

    prompt: Tensor | None
    head: dict[str, Tensor] | None
    meta: dict
    config: dict
    metrics: dict
    route: dict[str, Tensor] | None = None  # what routing needs (continual_rpt.routing); None in entries made before it

    def save_pretrained(self, folder: str | Path) -> dict[str, str]:
        """Write the entry to `folder` atomically (complete, or not there at all); return its files' sha256."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if self.prompt is not None and not torch.isfinite(self.prompt).all():
            raise BankError(f"{folder.name}: refusing to store a prompt with non-finite values")
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            if self.prompt is not None:
                save_file({"prompt": self.prompt.detach().float().cpu().contiguous()}, tmp / PROMPT_FILE)
                kill_point(f"bank.entry:{PROMPT_FILE}")
            if self.head is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.head.items()}, tmp / HEAD_FILE)
                kill_point(f"bank.entry:{HEAD_FILE}")
            if self.route is not None:
                save_file({k: v.detach().float().cpu().contiguous() for k, v in self.route.items()}, tmp / ROUTE_FILE)
                kill_point(f"bank.entry:{ROUTE_FILE}")
            for name, doc in ((META_FILE, self.meta), (CONFIG_FILE, self.config), (METRICS_FILE, self.metrics)):
                write_json(tmp / name, doc)
                kill_point(f"bank.entry:{name}")
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
            fsync_dir(folder.parent)
            kill_point("bank.entry-renamed")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return checksums

    @classmethod
    def from_pretrained(cls, folder: str | Path, checksums: dict[str, str] | None = None) -> Entry:
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
            if ROUTE_FILE in present - set(checksums):  # an add_route killed before the index listed it: not stored yet
                present.discard(ROUTE_FILE)
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
        for name in (PROMPT_FILE, HEAD_FILE, ROUTE_FILE):
            if (folder / name).is_file() and (checksums is None or name in checksums):
                try:
                    tensors[name] = load_file(folder / name)
                except Exception as err:  # safetensors raises its own error types for truncated files
                    raise BankError(f"{folder / name}: not a valid safetensors file ({err})") from err
        prompt = tensors[PROMPT_FILE].get("prompt") if PROMPT_FILE in tensors else None
        if PROMPT_FILE in tensors and prompt is None:
            raise BankError(f"{folder / PROMPT_FILE}: has no tensor named 'prompt'")
        return cls(prompt, tensors.get(HEAD_FILE), docs[META_FILE], docs[CONFIG_FILE], docs[METRICS_FILE], tensors.get(ROUTE_FILE))

    def check_backbone(self, backbone, where: Path | str) -> None:
        """Refuse a backbone other than the one the entry was trained on (other width or other weights)."""
        stored = self.meta.get("backbone")
        if not (isinstance(stored, dict) and isinstance(stored.get("fingerprint"), str) and isinstance(stored.get("width"), int)):
            raise BankError(f"{where}: field 'backbone' must hold 'fingerprint' (a string) and 'width' (an integer)")
        if stored["width"] != backbone.width:
            raise BankError(f"{where}: entry has width {stored['width']}, backbone {backbone.name!r} has {backbone.width}")
        if stored["fingerprint"] != backbone.fingerprint:
            raise BankError(f"{where}: entry was trained on backbone {stored.get('name')!r} with other weights "
                            f"(fingerprint {stored['fingerprint'][:12]}…, this one {backbone.fingerprint[:12]}…)")
        pooling = stored.get("pooling")  # recorded since pooling: auto; the head reads this pooled output
        if pooling is not None and pooling != getattr(backbone, "pooling", None):
            raise BankError(f"{where}: entry's head reads {pooling}-pooled outputs, backbone {backbone.name!r} pools by "
                            f"{getattr(backbone, 'pooling', None)}; load it with pooling {pooling}")
        prompt = self.prompt
        if prompt is not None and prompt.dim() == 3 and prompt.shape[0] != backbone.depth:
            raise BankError(f"{where}: deep prompt has {prompt.shape[0]} layers, backbone {backbone.name!r} has {backbone.depth}")
        if prompt is not None and (prompt.dim() not in (2, 3) or prompt.shape[-1] != backbone.width):
            raise BankError(f"{where}: prompt has shape {tuple(prompt.shape)}, expected (n, {backbone.width}) "
                            f"or, deep, ({backbone.depth}, n, {backbone.width})")


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
                return Entry.from_pretrained(self.path / check_name(name), item["files"])
        raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")

    def _remove_leftovers(self) -> None:
        """Temporary files and unlisted entry folders of writers that were killed (call with the lock held)."""
        listed = set(self.tasks())
        for path in self.path.iterdir():
            hidden = path.name.startswith(".") and path.name != LOCK_FILE
            unlisted = path.is_dir() and not path.name.startswith(".") and path.name not in listed
            if hidden or unlisted:
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
            checksums = entry.save_pretrained(folder)
            index = {**self._index, "entries": [*self._index["entries"], {"name": name, "files": checksums}]}
            replace_json(self.path / INDEX_FILE, index)
            self._index = index

    def add_route(self, name: str, route: dict[str, Tensor]) -> None:
        """Store route state for entry `name`, which has none; every file the entry already holds stays as it is."""
        with self._locked(self.path):
            self.refresh()
            item = next((item for item in self._index["entries"] if item["name"] == name), None)
            if item is None:
                raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")
            if ROUTE_FILE in item["files"]:
                raise BankError(f"{self.path / name / ROUTE_FILE}: the entry holds route state already; entries are never overwritten")
            self._remove_leftovers()
            folder = self.path / name
            tmp = self.path / f".{name}.{ROUTE_FILE}"  # outside the entry: a killed writer's leftover is removed by the next add
            save_file({k: v.detach().float().cpu().contiguous() for k, v in route.items()}, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            kill_point("bank.route-written")
            os.replace(tmp, folder / ROUTE_FILE)
            fsync_dir(folder)
            kill_point("bank.route-renamed")
            listed = {**item, "files": {**item["files"], ROUTE_FILE: _sha256(folder / ROUTE_FILE)}}
            index = {**self._index, "entries": [listed if i is item else i for i in self._index["entries"]]}
            replace_json(self.path / INDEX_FILE, index)
            self._index = index
