"""What a prompt-bank server holds: one loaded backbone, every entry of the bank ready to answer, and how rows become answers.

One backbone: `ServedBank` loads the frozen model once (the one the bank's entries name, with the
pooling their heads read, as `crpt bank predict` picks it) and every entry of the bank beside it: an
entry is its prompt (with any Progressive Prompts context), its head and its route state, a few
kilobytes each. Rows of different tasks then share one forward pass (`evaluation.mixed_option_scores`:
each row with its own P′ and head), and rows without a task are routed first, each entry compared with
the row as it reads it (`routing.route_readings`: each distinct reading featurized once per route featurization).

Snapshot swap: the loaded entries form an immutable `Snapshot`. `refresh` builds the next one beside
it (only entries new to bank.json are loaded, and an entry that `crpt bank index-routes` gave route
state is reloaded with the same prompt and head; the others are carried over as the same objects, so
their answers stay bit-identical) and swaps it in with one assignment. `answer` reads the snapshot
once and uses it for the whole batch, so a batch never sees half a refresh. The backbone itself is
the one shared mutable thing (its tokenizer and attention kernel switch): its use is serialised.

Checksum refusal: an entry whose files fail the index's checksums, or that does not fit the backbone,
is refused and logged (the message names the file), and the rest keep serving; it is tried again only
when its listing in bank.json changes. A writer lists an entry in bank.json only once its folder is
complete (`continual_rpt.bank`), so a reader of the index never meets a half-written entry.

Answers are `crpt bank predict`'s: rows are read by the same task parsers (`serving.rows`: the whole
row with a task; routed, its input fields alone, the entry chosen answering its own reading), routed by
the same functions over each entry's stored state (the Mahalanobis router's shared precision kept per
snapshot), and scored with each entry's inputs cut to the length, and in the precision (bf16 or fp32),
it was trained with: a batch holding both precisions is one forward per precision.

A broken entry fails its own requests only: where a mixed forward's scores hold NaN (NonFiniteScores: an
entry whose prompt or head has diverged, its checksums passed), that forward's rows are scored again entry
by entry; the requests needing an entry whose scores are NaN get `EntryScoresNaN` naming it, the others their answers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from torch import Tensor

from continual_rpt.backbones import EMBEDDED, Backbone, load_backbone
from continual_rpt.bank import INDEX_FILE, ROUTE_FILE, BankError, Entry, PromptBank
from continual_rpt.evaluation import Answerer, NonFiniteScores, length_batches, load_answerer, mixed_option_scores
from continual_rpt.routing import ROUTERS, Contender, Featurization, answerable, confidence, route_readings, shared_precision
from continual_rpt.serving.limits import Limits
from continual_rpt.serving.rows import Item, Parsed, RowError, read_for_routing, read_row
from continual_rpt.tasks import Example, Task

log = logging.getLogger(__name__)
ROUTE_KEYS = ("mean", "variance", "basis", "spread", "count", "temperature")  # what the routers read of a route state
_PROBE = Example("probe", (("probe", None),), "probe", ("yes", "no"), -1)  # featurized once per featurization: its width


class UnknownTask(LookupError):
    """A task the bank does not serve; the message names the ones it does."""


class EntryScoresNaN(RuntimeError):
    """A request needing entries whose scores are NaN (a broken prompt or head): the server's fault, not the request's."""

    def __init__(self, bank: Path, entries: list[str]) -> None:
        self.entries = entries
        super().__init__(f"{bank}: the scores of entry {', '.join(map(repr, entries))} are NaN (its prompt or head holds values "
                         "the model cannot compute with); the bank's other entries answer as before; replace the entry")


@dataclass(frozen=True)
class Answer:
    """One example answered: the task that answered it, its answer, and the scores of every option."""

    task: str
    prediction: str  # the label name, or the chosen candidate's text
    index: int
    options: list[str]
    scores: list[float]  # one per option, fp32 as the model scored them
    routing_score: float | None  # how sure the router was (None: the task was given)
    row: int = 0  # the request's row it answers (a MultiRC or ReCoRD row holds several examples)
    uid: str = ""  # the example's id as its task names it (`RTE/request/12`: task, origin, the row's idx)


@dataclass(frozen=True)
class Served:
    """One loaded entry: what answers with it, how its inputs are cut and scored, and its route state (None: not routed to)."""

    name: str
    answerer: Answerer
    listing: Mapping[str, str]  # the files bank.json listed for it when it was loaded, with their sha256
    max_tokens: int  # input tokens of a row, its prompt not counted: its training max_length less the prompt
    bf16: bool  # scored in bf16 as it was evaluated when trained
    featurization: Featurization | None

    @property
    def task(self) -> Task:
        """The entry's task."""
        return self.answerer.task

    @property
    def route(self) -> dict[str, Tensor] | None:
        """The stored route state, where the entry is routed to."""
        return self.answerer.entry.route if self.featurization else None


class Refusal(NamedTuple):
    """Why an entry is not served: its listing when refused, the reason, and whether files it lists are missing yet."""

    listing: Mapping[str, str]
    reason: str
    incomplete: bool  # tried again on every refresh (a bank synced from elsewhere, bank.json first), not only when listed anew


@dataclass(frozen=True)
class Snapshot:
    """The entries served at one moment (bank.json order), and those refused with why; never changed once made."""

    generation: int
    entries: Mapping[str, Served]
    refused: Mapping[str, Refusal]
    _precisions: dict[tuple[str, ...], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def routable(self) -> list[str]:
        """The entries routed to (those holding usable route state)."""
        return [name for name, served in self.entries.items() if served.featurization is not None]

    def precision(self, readers: tuple[str, ...]) -> Tensor:
        """The Mahalanobis router's shared precision over these entries' route states, computed once per snapshot."""
        if readers not in self._precisions:  # two threads may both compute it: the same tensor either way
            self._precisions[readers] = shared_precision([self.entries[name].route for name in readers])
        return self._precisions[readers]


class ServedBank:
    """A prompt bank loaded for serving: `parse` checks requests, `answer` answers many in one mixed batch, `refresh` grows it."""

    def __init__(self, bank_path: str | Path, backbone: str | None = None, device: str = "cpu", router: str = "mahalanobis",
                 batch_size: int = Limits().forward_batch) -> None:
        if router not in ROUTERS:
            raise ValueError(f"router {router!r}: choose one of {', '.join(ROUTERS)}")
        self.path = Path(bank_path)
        self.router, self.device, self.batch_size = router, device, batch_size
        self.backbone: Backbone | None = None  # loaded with the first entry: a bank may start empty
        self._backbone_name = backbone
        self._bank = PromptBank.open(self.path)
        self._snapshot = Snapshot(0, MappingProxyType({}), MappingProxyType({}))
        self._index_stat: tuple[int, int, int] | None = None
        self._feature_widths: dict[Featurization, int] = {}
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._model_lock = threading.Lock()  # the backbone's tokenizer and attention kernel are shared state
        self.refresh()
        if self._bank.tasks() and not self._snapshot.entries:
            reasons = "; ".join(refusal.reason for refusal in self._snapshot.refused.values())
            raise BankError(f"{self.path}: none of its entries can be served ({reasons})")

    @property
    def generation(self) -> int:
        """Bumped each time the served entries change."""
        return self._snapshot.generation

    @property
    def ready(self) -> bool:
        """Whether the backbone and an entry are loaded (false only while the bank holds no usable entry yet)."""
        return bool(self._snapshot.entries)

    @property
    def snapshot(self) -> Snapshot:
        """The entries served now."""
        return self._snapshot

    # --- what is served ------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        """Every served entry: name, labels, method, prompt shape, backbone, the row fields it reads, and whether it is routed to."""
        return [self._describe(served) for served in self._snapshot.entries.values()]

    def task(self, name: str) -> dict:
        """One served entry, as `tasks` describes it; UnknownTask if the bank does not serve it."""
        snapshot = self._snapshot
        if name not in snapshot.entries:
            raise self._unknown(name, snapshot)
        return self._describe(snapshot.entries[name])

    @staticmethod
    def _describe(served: Served) -> dict:
        entry, task = served.answerer.entry, served.task
        backbone = entry.meta.get("backbone", {})
        return {"name": served.name, "task": task.name, "kind": task.kind, "labels": list(task.label_names),
                "method": entry.meta.get("method"), "prompt_shape": None if entry.prompt is None else list(entry.prompt.shape),
                "backbone": backbone.get("name"), "fields": list(task.input_fields), "routed": served.featurization is not None}

    def _unknown(self, name: str, snapshot: Snapshot) -> UnknownTask:
        refused = f" (its entry is refused: {snapshot.refused[name].reason})" if name in snapshot.refused else ""
        return UnknownTask(f"{self.path}: no task {name!r}{refused}; it serves {', '.join(snapshot.entries) or 'none yet'}")

    # --- requests ------------------------------------------------------------------------------------

    def parse(self, task: str | None, rows: Sequence[dict], origin: str = "request") -> Parsed:
        """Check and read a request's rows (no forward pass): UnknownTask for a task not served, RowError for a row none can read."""
        return self._parse(self._snapshot, task, rows, origin)

    def _parse(self, snapshot: Snapshot, task: str | None, rows: Sequence[dict], origin: str) -> Parsed:
        if task is not None and task not in snapshot.entries:
            raise self._unknown(task, snapshot)
        routed = {name: snapshot.entries[name].task for name in snapshot.routable()}
        readings = []
        for i, row in enumerate(rows):
            where = f"{origin}:{i + 1}"  # as a file's line: parsers name the split by the part before the colon
            if task is not None:
                readings.append({task: read_row(snapshot.entries[task].task, row, i, where, labelled=True)})
            elif not routed:
                raise RowError(i, None, f"no entry of {self.path} is routed to (none holds route state); give the task")
            else:
                readings.append(read_for_routing(routed, row, i, where))
        return Parsed(task, tuple(rows), tuple(MappingProxyType(r) for r in readings), snapshot.generation, origin)

    def answer(self, batch: Sequence[Parsed]) -> list[list[Answer] | EntryScoresNaN]:
        """Answer `batch` in mixed-task forwards (rows without a task routed first): per request, its answers or EntryScoresNaN."""
        snapshot = self._snapshot  # one snapshot for the whole batch, whatever refresh does meanwhile
        batch = [p if p.task is not None or p.generation == snapshot.generation else self._parse(snapshot, None, p.rows, p.origin)
                 for p in batch]  # entries landed since the rows were read: offer the routed rows to them too
        items = [Item(r, i, k, reading) for r, p in enumerate(batch) for i, reading in enumerate(p.readings)
                 for k in range(len(next(iter(reading.values()))))]
        routed = [n for n, item in enumerate(items) if batch[item.request].task is None]
        owner: dict[int, tuple[str, float | None]] = {n: (batch[item.request].task, None) for n, item in enumerate(items)}
        with self._model_lock:
            if self.router == "confidence":  # every entry that can score a routed row answers it; the surest wins
                jobs = [(n, owner[n][0]) for n in range(len(items)) if owner[n][0] is not None]
                jobs += [(n, name) for n in routed for name in self._allowed(snapshot, items[n])]
            else:
                owner.update(self._route(snapshot, items, routed))
                jobs = [(n, owner[n][0]) for n in range(len(items))]
            scores = self._score(snapshot, [(name, items[n].example(name)) for n, name in jobs])
        chosen: dict[int, tuple[float, str, Tensor]] = {}
        failed: dict[int, list[str]] = {}  # request -> the entries it needs whose scores are NaN
        for (n, name), s in zip(jobs, scores):
            if s is None:
                failed.setdefault(items[n].request, []).append(name)
                continue
            if owner[n][0] is not None:
                chosen[n] = (0.0, name, s)
                continue
            sure = confidence(s, float(snapshot.entries[name].route["temperature"]))
            if n not in chosen or sure > chosen[n][0]:  # ties go to the entry added first, as routing.route breaks them
                chosen[n] = (sure, name, s)
        out: list[list[Answer] | EntryScoresNaN] = [EntryScoresNaN(self.path, list(dict.fromkeys(failed[r]))) if r in failed else []
                                                    for r in range(len(batch))]
        for n, item in enumerate(items):
            if item.request in failed:
                continue
            sure, name, s = chosen[n]
            routing_score = owner[n][1] if owner[n][0] is not None else sure
            out[item.request].append(self._answer(snapshot.entries[name], item.example(name), s, routing_score, item.row))
        return out

    @staticmethod
    def _allowed(snapshot: Snapshot, item: Item) -> list[str]:
        """The entries reading the item's row that can score its example."""
        names = list(item.reading)
        allowed = answerable([snapshot.entries[name].task.kind for name in names], [item.example()])[0]
        return [name for name, ok in zip(names, allowed.tolist()) if ok]

    def _route(self, snapshot: Snapshot, items: list[Item], routed: list[int]) -> dict[int, tuple[str, float]]:
        """Entry and routing score of every routed item, as `crpt bank predict` routes it: among the entries reading its
        row, each compared with the row as it reads it (`routing.route_readings`)."""
        readings = [{name: items[n].example(name) for name in items[n].reading} for n in routed]
        contenders = {name: Contender(served.featurization, served.route, served.task.kind)
                      for name, served in snapshot.entries.items() if any(name in reading for reading in readings)}
        chosen = route_readings(self.backbone, readings, contenders, self.router, self.path, self.batch_size, snapshot.precision)
        return dict(zip(routed, chosen))

    def _score(self, snapshot: Snapshot, jobs: list[tuple[str, Example]]) -> list[Tensor | None]:
        """Every (entry, example)'s option scores (None where its entry's are NaN): mixed-task forwards per precision."""
        out: list[Tensor | None] = [None] * len(jobs)
        for bf16 in (True, False):
            mine = [j for j, (name, _) in enumerate(jobs) if snapshot.entries[name].bf16 == bf16]
            if not mine:
                continue
            names = list(dict.fromkeys(jobs[j][0] for j in mine))
            features = [None] * len(mine)
            for name in names:
                served = snapshot.entries[name]
                positions = [p for p, j in enumerate(mine) if jobs[j][0] == name]
                for p, f in zip(positions, self.backbone.featurize([jobs[mine[p]][1] for p in positions], served.max_tokens)):
                    features[p] = f
            answerers = [snapshot.entries[name].answerer for name in names]
            owners = [names.index(jobs[j][0]) for j in mine]
            for forward in length_batches(features, self.batch_size):  # each scored on its own: a NaN costs one forward again
                for p, s in zip(forward, self._forward(answerers, [owners[p] for p in forward], [features[p] for p in forward], bf16)):
                    out[mine[p]] = s
        return out

    def _forward(self, answerers: list[Answerer], owners: list[int], features: list, bf16: bool) -> list[Tensor | None]:
        """One mixed-task forward's scores; where any is NaN, its rows scored again entry by entry, None for an entry's that are NaN."""
        try:
            return mixed_option_scores(self.backbone, answerers, owners, features, len(features), bf16)
        except NonFiniteScores:
            if len(set(owners)) == 1:
                return [None] * len(features)
            out: list[Tensor | None] = [None] * len(features)
            for owner in dict.fromkeys(owners):
                rows = [i for i, o in enumerate(owners) if o == owner]
                for i, s in zip(rows, self._forward([answerers[owner]], [0] * len(rows), [features[i] for i in rows], bf16)):
                    out[i] = s
            return out

    @staticmethod
    def _answer(served: Served, example: Example, scores: Tensor, routing_score: float | None, row: int) -> Answer:
        task = served.task
        options = list(task.label_names) if task.kind == "classification" else list(example.candidates)
        index = int(scores.argmax())
        return Answer(served.name, options[index], index, options, scores[: len(options)].tolist(), routing_score, row, example.uid)

    # --- growing -------------------------------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Load what bank.json lists and is not served yet (new entries, route state added to one); the names (re)loaded.

        bank.json is read again only when it changed (its mtime, size and inode); an entry some of whose files
        are missing is tried again on every call, until they arrive.
        """
        with self._refresh_lock:
            index, old = self.path / INDEX_FILE, self._snapshot
            try:
                stat = os.stat(index)
                key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if key == self._index_stat and not any(refusal.incomplete for refusal in old.refused.values()):
                    return []
                if key != self._index_stat:
                    self._index_stat = key  # taken before reading: a write in between shows as one more change
                    self._bank.refresh()
            except (OSError, BankError) as err:
                log.error("%s: cannot read the bank index, serving what was loaded: %s", index, err)
                return []
            entries, refused, loaded = dict(old.entries), dict(old.refused), []
            for name in self._bank.tasks():
                files, before = self._bank.files(name), refused.get(name)
                if (name in entries and entries[name].listing == files) or (before and before.listing == files and not before.incomplete):
                    continue
                try:
                    entries[name] = self._load(name, files, entries.get(name))
                except (ValueError, OSError) as err:  # BankError and DataError among them
                    refused[name] = Refusal(files, str(err), not all((self.path / name / file).is_file() for file in files))
                    if refused[name] != before:  # logged once, not on every try
                        kept = "the files loaded before keep serving it" if name in entries else "not served"
                        log.error("%s: entry %r refused, %s (the other entries serve as before): %s", self.path, name, kept, err)
                    continue
                refused.pop(name, None)
                loaded.append(name)
                log.info("%s: serving %r%s", self.path, name, "" if entries[name].featurization else " (not routed to)")
            if loaded or refused != old.refused:  # else the snapshot stays, with the router precisions it keeps
                self._snapshot = Snapshot(old.generation + bool(loaded), MappingProxyType(entries), MappingProxyType(refused))
            return loaded

    def _load(self, name: str, files: dict[str, str], old: Served | None) -> Served:
        """Entry `name` ready to answer; `old`, where it was served already, lends its prompt and head (route state was added)."""
        entry = self._bank.get(name)  # checked against the index's checksums
        if self.backbone is None:
            self.backbone = self._load_backbone(entry)
        same_files = old is not None and {k: v for k, v in old.listing.items() if k != ROUTE_FILE} == \
            {k: v for k, v in files.items() if k != ROUTE_FILE}
        answerer = old.answerer._replace(entry=entry) if same_files else load_answerer(self._bank, name, self.backbone)
        train = entry.config.get("train", {})
        n_tokens = 0 if answerer.prompt is None else answerer.prompt.shape[-2]
        return Served(name, answerer, MappingProxyType(files), int(train.get("max_length", 256)) - n_tokens,
                      bool(train.get("bf16", True)), self._featurization(name, entry))

    def _load_backbone(self, entry: Entry) -> Backbone:
        """The backbone the entry names (or the one given), with the pooling its head reads: `crpt bank predict`'s choice."""
        stored = entry.meta.get("backbone")
        if not isinstance(stored, dict) or not isinstance(stored.get("name"), str):
            raise BankError(f"{self.path}: an entry's field 'backbone' must name the backbone")
        name = self._backbone_name or stored["name"]
        if name not in (EMBEDDED, self._backbone_name):
            log.warning("loading backbone %r, named by the bank's entries (neither the embedded one nor the one given); "
                        "only its safetensors weights are read", name)
        return load_backbone(name, entry.pooling, self.device)

    def _featurization(self, name: str, entry: Entry) -> Featurization | None:
        """How the entry's route state featurized its inputs; None (logged) where it has none this backbone can repeat."""
        where = self.path / name / ROUTE_FILE
        if entry.route is None:
            return None
        try:
            missing = [key for key in ROUTE_KEYS if key not in entry.route]
            if missing:
                raise BankError(f"{where}: route state lacks {', '.join(missing)}")
            featurization = Featurization.of_entry(entry, where)
            if featurization not in self._feature_widths:
                with self._model_lock:  # refused there if this library or backbone featurizes otherwise
                    self._feature_widths[featurization] = featurization.features(self.backbone, [_PROBE], where).shape[1]
            if entry.route["mean"].shape[0] != self._feature_widths[featurization]:
                raise BankError(f"{where}: route state of {entry.route['mean'].shape[0]} features, this backbone's inputs have "
                                f"{self._feature_widths[featurization]}; the entry was made by another version")
        except BankError as err:
            log.warning("%s: entry %r is answered only when its task is given, not routed to: %s", self.path, name, err)
            return None
        return featurization
