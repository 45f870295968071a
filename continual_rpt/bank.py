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
added, with the sha256 of every file. A bank is made only in a new or empty folder. An entry is
written to a temporary folder, fsynced and renamed into place, and only then listed in the index
(itself replaced atomically), so a reader never sees a half-written entry. A lock file keeps two
writers apart (the second waits) and notes which entry its holder is placing. A bank writer removes
nothing but what killed writers left: their temporary names (`continual_rpt.atomic`) and the one
entry folder a writer killed between its rename and the index had placed, as its lock note says.
Anything else in the folder is left alone, and a name already taken by a folder is refused. The
one thing ever added to a stored entry is route state it lacks (`add_route`, for entries made
before routing existed): the file lands beside the others and counts only once the index lists
it, so a writer killed in between leaves the entry as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from continual_rpt.atomic import fsync_dir, is_temp_name, lock_name, remove_dead_temps, replace_json, temp_path, write_json
from continual_rpt.faults import kill_point
from continual_rpt.locks import LOCK_FILE, FolderBusy, Lock, locked, pid_alive

PROMPT_FILE, HEAD_FILE, ROUTE_FILE = "prompt.safetensors", "head.safetensors", "route.safetensors"
META_FILE, CONFIG_FILE, METRICS_FILE = "entry.json", "config.json", "metrics.json"
ENTRY_FILES = frozenset({PROMPT_FILE, HEAD_FILE, ROUTE_FILE, META_FILE, CONFIG_FILE, METRICS_FILE})
INDEX_FILE = "bank.json"
BANK_FORMAT = "continual-rpt-bank/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
PLACING = "placing "  # the lock note of a writer about to rename an entry folder into place


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

    def save_pretrained(self, folder: str | Path, overwrite: bool = True) -> dict[str, str]:
        """Write the entry to `folder` atomically (the old folder or the complete new one); return its files' sha256.

        With overwrite=False an existing `folder` is refused, checked at write time under a lock
        beside it, so two writers of one folder never replace each other.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if self.prompt is not None and not torch.isfinite(self.prompt).all():
            raise BankError(f"{folder.name}: refusing to store a prompt with non-finite values")
        if overwrite:
            return self._write(folder)
        try:
            with locked(folder.parent, name=lock_name(folder), remove=True):
                remove_dead_temps(folder.parent)  # what killed writers left here
                if os.path.lexists(folder):
                    raise FileExistsError(f"{folder} already exists; choose another folder (nothing was overwritten)")
                return self._write(folder)
        except FolderBusy as err:
            raise FolderBusy(f"{folder}: another process ({err.holder}) is writing it now; choose another folder "
                             "(nothing was overwritten)", err.holder) from None

    def _write(self, folder: Path) -> dict[str, str]:
        tmp = temp_path(folder)
        tmp.mkdir()
        aside = None
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
            if os.path.lexists(folder):  # moved aside, not removed, until the new folder is in place
                aside = temp_path(folder, "old")
                os.rename(folder, aside)
                kill_point("bank.entry-moved-aside")
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
            kill_point("bank.entry-renamed")
        except BaseException:
            if aside is not None and not os.path.lexists(folder):
                os.rename(aside, folder)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if aside is not None:
            shutil.rmtree(aside)
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

    @property
    def pooling(self) -> str:
        """The pooling its head reads: as recorded, else (entries made before it was) its stream's, whose default then was cls."""
        return self.meta.get("backbone", {}).get("pooling") or self.config.get("backbone", {}).get("pooling", "cls")

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
            cls.check_creatable(path)  # before the lock file is made: a refused folder is left untouched
            path.mkdir(parents=True, exist_ok=True)
            with locked(path, wait=True):
                if not index_path.is_file():
                    cls.check_creatable(path)
                    remove_dead_temps(path)
                    replace_json(index_path, {"format": BANK_FORMAT, "entries": []})
        return cls(path, cls._read_index(index_path))

    @staticmethod
    def check_creatable(path: str | Path) -> None:
        """Refuse a folder that a new bank would share with anything else (a bank's lock and dead writers' leftovers aside)."""
        path = Path(path)
        if (path / INDEX_FILE).is_file() or not os.path.lexists(path):
            return
        if not path.is_dir():
            raise BankError(f"{path}: exists and is not a folder; a prompt bank is made only in a new or empty folder")
        others = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE and not is_temp_name(p.name))
        if others:
            raise BankError(f"{path}: exists, is not a prompt bank (no {INDEX_FILE}) and is not empty (it holds "
                            f"{', '.join(others[:3])}{', …' if len(others) > 3 else ''}); a bank is made only in a new or "
                            "empty folder; nothing was changed")

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

    def refresh(self) -> None:
        """Re-read the index (another process may have added entries)."""
        self._index = self._read_index(self.path / INDEX_FILE)

    def tasks(self) -> list[str]:
        """Entry names in the order they were added."""
        return [item["name"] for item in self._index["entries"]]

    def __contains__(self, name: str) -> bool:
        return name in self.tasks()

    def files(self, name: str) -> dict[str, str]:
        """The files the index lists for entry `name`, each with its sha256 (what a reader compares to see it change)."""
        for item in self._index["entries"]:
            if item["name"] == name:
                return dict(item["files"])
        raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")

    def get(self, name: str) -> Entry:
        """The entry stored for `name`, checked against the index's checksums."""
        for item in self._index["entries"]:
            if item["name"] == name:
                return Entry.from_pretrained(self.path / check_name(name), item["files"])
        raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")

    def _remove_leftovers(self, lock: Lock) -> None:
        """What killed writers left, and nothing else (call with the lock held): their temporary names, and
        the entry folder that the lock's note says a killed writer placed but did not list."""
        remove_dead_temps(self.path)
        pid, _, note = lock.left.partition("\n")
        placed = note.removeprefix(PLACING) if note.startswith(PLACING) and pid.isdigit() and not pid_alive(int(pid)) else None
        if placed and check_name(placed) not in self and (self.path / placed).is_dir():
            if {p.name for p in (self.path / placed).iterdir()} <= ENTRY_FILES:  # an entry's files only: not a user's folder
                aside = temp_path(self.path / placed)
                os.rename(self.path / placed, aside)
                shutil.rmtree(aside)

    def add(self, name: str, entry: Entry) -> None:
        """Store a new entry; an existing name is refused, so nothing stored is ever overwritten."""
        check_name(name)
        with locked(self.path, wait=True) as lock:
            self.refresh()
            if name in self:
                raise BankError(f"{self.path}: already has an entry for {name!r}; entries are never overwritten")
            self._remove_leftovers(lock)
            folder = self.path / name
            if os.path.lexists(folder):
                raise BankError(f"{folder}: exists but the bank's index does not list it (not an entry of this bank); "
                                "move it away or choose another name; nothing was changed")
            lock.note(f"{PLACING}{name}")  # if killed once the folder is in place, the next writer knows it is ours
            checksums = entry.save_pretrained(folder)
            index = {**self._index, "entries": [*self._index["entries"], {"name": name, "files": checksums}]}
            replace_json(self.path / INDEX_FILE, index)
            self._index = index

    def add_route(self, name: str, route: dict[str, Tensor]) -> None:
        """Store route state for entry `name`, which has none; every file the entry already holds stays as it is."""
        with locked(self.path, wait=True) as lock:
            self.refresh()
            item = next((item for item in self._index["entries"] if item["name"] == name), None)
            if item is None:
                raise BankError(f"{self.path}: no entry for task {name!r}; it has {', '.join(self.tasks()) or 'none'}")
            if ROUTE_FILE in item["files"]:
                raise BankError(f"{self.path / name / ROUTE_FILE}: the entry holds route state already; entries are never overwritten")
            self._remove_leftovers(lock)
            folder = self.path / name
            tmp = temp_path(self.path / f"{name}.{ROUTE_FILE}")  # outside the entry: a killed writer's is removed by the next writer
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
