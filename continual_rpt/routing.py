"""Routing: which bank entry answers an input whose task is not given.

When a task is learned its entry also stores `route.safetensors`, computed from the task's
training inputs on the frozen backbone without any prompt (`Backbone.input_features`: the pooled
output, the states of the first tokens and the log length of each segment, D = 2d + 2 on an encoder):
    mean [D], variance [D]      of the inputs' features
    basis [k, D], spread [k]    the k leading principal directions and the variance along each
    count [1]                   how many inputs were summarised
    temperature [1]             the entry's softmax temperature, fit on its dev split (confidence router)
    max_length, bf16, pooling, feature_version [1] each: the featurization the state was built with
A router is a pure function of the stored states of the entries it is given, so learning task j
never changes how earlier inputs are routed except by j competing with them. Routing reads
inputs only, never labels.

One featurization, each entry's own reading: every caller (a run's task-free scores, `crpt bank predict`
without a task, the server) routes a row among the entries whose tasks read it through `route_readings`,
which compares each entry with the row as that entry's task reads it (on a seq2seq or decoder backbone
the source names the task: "cb premise: …" and "rte premise: …" are two readings of one row, and each
looks like its own task's training inputs), featurized as the entry's route state says it featurized that
entry's training inputs (`Featurization.of_entry`): truncated to the entry's max_length, in bf16 or fp32
as it was, with the pooling it was built with. Entries stored before the featurization was recorded were
built at their stored config's train.max_length (and train.bf16), which is what they fall back to. A
row's distance to entry t is thus measured from t's reading as t's state would have summarised it (the
Mahalanobis router's shared covariance still pools every state). Each distinct (reading, featurization)
of a row is featurized once: where the readings tokenize alike (an encoder's text pairs, usually the same
for every task reading a row), once per featurization.

Routers:
    mahalanobis  nearest task mean under one covariance shared by the tasks: the count-weighted mean of
                 each task's low-rank-plus-diagonal covariance, shrunk towards its mean variance
    prototype    nearest task mean by cosine similarity
    confidence   every entry answers with its own prompt and head; the one most sure of its answer
                 (temperature-scaled, normalised for its number of options) wins: one forward pass per entry
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from continual_rpt.backbones import Backbone, Features
from continual_rpt.bank import ROUTE_FILE, BankError, Entry, PromptBank
from continual_rpt.evaluation import bank_option_scores, option_scores, per_example
from continual_rpt.tasks import Example, task_from_meta

ROUTERS = ("mahalanobis", "prototype", "confidence")
RANK = 8  # principal directions kept per task; the rest of its variance is kept per coordinate
SHRINKAGE = 0.1  # weight of the isotropic part in the shared covariance (d = 384 features, a few hundred inputs per task)
MAX_INPUTS = 2000  # training inputs summarised per task (a seeded subset beyond that)
TEMPERATURES = tuple(10 ** (k / 10) for k in range(-10, 16))  # 0.1 … 31.6, log-spaced
FEATURE_VERSION = 1  # what Backbone.input_features computes; raise it when a family's features change
POOLING_CODES = ("none", "cls", "mean")  # route state stores the pooling as its index here ("none": the family has no choice)
FEATURIZATION_KEYS = ("max_length", "bf16", "pooling", "feature_version")


def input_features(backbone: Backbone, features: list[Features], batch_size: int = 64, bf16: bool = True) -> Tensor:
    """The prompt-free feature vector of every featurized example, [N, d] fp32, in input order."""
    return torch.stack(per_example(backbone, features, batch_size, bf16, lambda _, batch: backbone.input_features(batch)))


@dataclass(frozen=True)
class Featurization:
    """How inputs became an entry's route features: truncation, precision, pooling and feature version."""

    max_length: int
    bf16: bool
    pooling: str  # one of POOLING_CODES
    version: int = FEATURE_VERSION

    @classmethod
    def of(cls, backbone: Backbone, max_length: int, bf16: bool) -> Featurization:
        """The featurization `backbone` applies at this max_length and precision."""
        return cls(max_length, bf16, getattr(backbone, "pooling", None) or "none")

    @classmethod
    def of_entry(cls, entry: Entry, where) -> Featurization:
        """What the entry's route state was built with: as stored, else (older entries) as its config trained it."""
        route = entry.route
        if "max_length" in route:
            code = int(route["pooling"])
            if not 0 <= code < len(POOLING_CODES):
                raise BankError(f"{where}: route state's pooling code {code} is not one of 0..{len(POOLING_CODES) - 1}")
            return cls(int(route["max_length"]), bool(route["bf16"]), POOLING_CODES[code], int(route["feature_version"]))
        train = entry.config.get("train", {})
        return cls(int(train.get("max_length", 256)), bool(train.get("bf16", True)), entry.pooling, FEATURE_VERSION)

    def tensors(self) -> dict[str, Tensor]:
        """The featurization as route-state entries (safetensors hold tensors only)."""
        return {"max_length": torch.tensor([float(self.max_length)]), "bf16": torch.tensor([float(self.bf16)]),
                "pooling": torch.tensor([float(POOLING_CODES.index(self.pooling))]),
                "feature_version": torch.tensor([float(self.version)])}

    def check(self, backbone: Backbone, where) -> None:
        """Refuse (BankError naming `where`) where `backbone` cannot repeat this featurization."""
        if self.version != FEATURE_VERSION:
            raise BankError(f"{where}: route state of feature version {self.version}, this library computes version "
                            f"{FEATURE_VERSION}; the entry was made by another version")
        pooling = getattr(backbone, "pooling", None) or "none"
        if self.pooling != pooling and "none" not in (self.pooling, pooling):
            raise BankError(f"{where}: route state built with {self.pooling} pooling, the backbone pools by {pooling}")

    def features(self, backbone: Backbone, examples: list[Example], where, batch_size: int = 64) -> Tensor:
        """The route features of `examples` under this featurization, [N, D]; refused where `backbone` cannot repeat it."""
        self.check(backbone, where)
        return input_features(backbone, backbone.featurize(examples, self.max_length), batch_size, self.bf16)


class Contender(NamedTuple):
    """What routing compares of one entry: how its training inputs were featurized, their summary (route state), its task's kind."""

    featurization: Featurization
    state: dict[str, Tensor]
    kind: str


def bank_contenders(bank: PromptBank, names: list[str]) -> dict[str, Contender]:
    """The entries `names` of `bank` (each holding route state) as routing compares them."""
    entries = {name: bank.get(name) for name in names}
    return {name: Contender(Featurization.of_entry(e, bank.path / name / ROUTE_FILE), e.route, e.meta.get("kind"))
            for name, e in entries.items()}


def reading_features(backbone: Backbone, readings: Sequence[Mapping[str, Example]], featurizations: Mapping[str, Featurization],
                     where, batch_size: int = 64, cache: dict | None = None, keys: Sequence | None = None) -> list[dict[str, Tensor]]:
    """Every row's route features [D] as each entry reading it reads it (`readings[i]`: entry -> its reading of row i),
    under that entry's featurization.

    A row's readings that tokenize alike under one featurization (an encoder's: the same text pairs) are featurized
    once; rows are never merged, so each featurization's batches hold the rows in order, as one reading of them would.
    `cache` (optional) keeps the features between calls under (featurization, `keys[i]`, tokens): `keys` name the
    rows across calls (default: their positions, for a cache of one call).
    """
    cache = {} if cache is None else cache
    keys = range(len(readings)) if keys is None else keys
    out: list[dict[str, Tensor]] = [{} for _ in readings]
    for f in dict.fromkeys(featurizations[name] for reading in readings for name in reading):
        wanted = [(i, name) for i, reading in enumerate(readings) for name in reading if featurizations[name] == f]
        f.check(backbone, where / wanted[0][1] / ROUTE_FILE)
        tokens = backbone.featurize([readings[i][name] for i, name in wanted], f.max_length)
        slots = [(f, keys[i], tuple(map(tuple, t.ids)), tuple(map(tuple, t.types))) for (i, _), t in zip(wanted, tokens)]
        todo = {slot: t for slot, t in zip(slots, tokens) if slot not in cache}  # first appearance: rows in order
        if todo:
            cache.update(zip(todo, input_features(backbone, list(todo.values()), batch_size, f.bf16)))
        for (i, name), slot in zip(wanted, slots):
            out[i][name] = cache[slot]
    return out


def summarize_inputs(x: Tensor, rank: int = RANK) -> dict[str, Tensor]:
    """Mean, per-coordinate variance and the leading principal directions of a task's input features."""
    x = x.double()
    n = x.shape[0]
    mean = x.mean(0)
    centred = x - mean
    k = max(0, min(rank, n - 1))
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    denominator = max(n - 1, 1)
    return {"mean": mean.float(), "variance": (centred.pow(2).sum(0) / denominator).float(),
            "basis": vh[:k].float().contiguous(), "spread": (s[:k] ** 2 / denominator).float(),
            "count": torch.tensor([float(n)])}


def fit_temperature(scores: list[Tensor], labels: list[int]) -> float:
    """The temperature (from a log-spaced grid) that minimises the dev negative log-likelihood."""
    def nll(t: float) -> float:
        return -sum(float((s / t).log_softmax(-1)[y]) for s, y in zip(scores, labels)) / len(labels)

    return min(TEMPERATURES, key=nll) if scores else 1.0


def route_state(backbone: Backbone, train: list[Example], dev: list[Example], prompt: Tensor | None, head, max_length: int,
                seed: int, batch_size: int = 64, bf16: bool = True) -> dict[str, Tensor]:
    """What routing needs of one task: its input summary (training inputs, no prompt) and its dev temperature."""
    if len(train) > MAX_INPUTS:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:MAX_INPUTS]
        train = [train[i] for i in sorted(order.tolist())]
    featurization = Featurization.of(backbone, max_length, bf16)
    state = {**summarize_inputs(featurization.features(backbone, train, "training inputs", batch_size)), **featurization.tensors()}
    n_tokens = 0 if prompt is None else prompt.shape[-2]
    labelled = [ex for ex in dev if ex.label >= 0]
    if not labelled:
        return {**state, "temperature": torch.tensor([1.0])}
    scores = option_scores(backbone, prompt, head, backbone.featurize(labelled, max_length - n_tokens), batch_size, bf16)
    state["temperature"] = torch.tensor([fit_temperature(scores, [ex.label for ex in labelled])])
    return state


def shared_precision(states: list[dict[str, Tensor]]) -> Tensor:
    """Inverse of the count-weighted mean of the tasks' covariances (low rank + diagonal), shrunk."""
    d = states[0]["mean"].shape[0]
    total = sum(float(s["count"]) for s in states)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in states:
        basis, spread = s["basis"].double(), s["spread"].double()
        low_rank = basis.T @ torch.diag(spread) @ basis
        rest = (s["variance"].double() - low_rank.diagonal()).clamp_min(0)
        cov += float(s["count"]) / total * (low_rank + torch.diag(rest))
    average = cov.diagonal().mean().clamp_min(1e-12)
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * average * torch.eye(d, dtype=torch.float64)
    return torch.linalg.inv(cov)


def state_views(x: Tensor | list[Tensor], states: list[dict[str, Tensor]]) -> list[Tensor]:
    """The inputs' features as each state sees them, fp64: `x` [N, D] for all states, or a list of one per state."""
    views = [x] * len(states) if isinstance(x, Tensor) else x
    if len(views) != len(states):
        raise ValueError(f"{len(views)} feature matrices for {len(states)} route states")
    return [view.double() for view in views]


def mahalanobis_distances(x: Tensor | list[Tensor], states: list[dict[str, Tensor]], precision: Tensor | None = None) -> Tensor:
    """Squared Mahalanobis distance of every input to every state's mean under the shared covariance, [N, T] fp64.

    `x` is the inputs' features [N, D], or one such matrix per state (each under its state's featurization);
    `precision` is `shared_precision(states)`, where the caller keeps it (a server routing batch after batch).
    """
    precision = shared_precision(states) if precision is None else precision
    columns = []
    for view, s in zip(state_views(x, states), states):
        diff = view - s["mean"].double()
        columns.append(((diff @ precision) * diff).sum(1))
    return torch.stack(columns, 1)


def route_features(x: Tensor | list[Tensor], states: list[dict[str, Tensor]], router: str,
                   allowed: Tensor | None = None, precision: Tensor | None = None) -> tuple[list[int], list[float]]:
    """Index of the chosen state for every input, and its routing score: mahalanobis, the winner's share of the softmax
    of −½ squared distance over the allowed states (a Gaussian posterior with equal priors, at no fitted temperature: not
    calibrated: high on wrong routes too); prototype, its cosine similarity in [−1, 1].

    `x` as for `mahalanobis_distances`; `allowed` [N, T] (bool) leaves out the states an example cannot
    go to (an entry that cannot read it); `precision` as for `mahalanobis_distances`.
    """
    views = state_views(x, states)
    allowed = torch.ones(views[0].shape[0], len(states), dtype=torch.bool) if allowed is None else allowed
    if router == "prototype":
        unit = torch.nn.functional.normalize
        similarity = torch.stack([unit(view, dim=1) @ unit(s["mean"].double(), dim=0) for view, s in zip(views, states)], 1)
        best = similarity.masked_fill(~allowed, float("-inf")).max(1)
        return best.indices.tolist(), best.values.tolist()
    if router != "mahalanobis":
        raise ValueError(f"router {router!r}: choose one of {', '.join(ROUTERS)}")
    distance = mahalanobis_distances(views, states, precision).masked_fill(~allowed, float("inf"))
    posterior = (-distance / 2).softmax(1)  # equal priors, one shared Gaussian shape
    best = posterior.max(1)
    return best.indices.tolist(), best.values.tolist()


def confidence(scores: Tensor, temperature: float) -> float:
    """How sure an answer is, 0 (uniform over its options) to 1 (certain), after temperature scaling."""
    finite = scores[torch.isfinite(scores)]
    options = finite.numel()
    if options < 2:
        return 0.0
    top = float((finite / temperature).softmax(-1).max())
    return (top - 1 / options) / (1 - 1 / options)


def can_answer(kind: str, example: Example) -> bool:
    """Whether a task of `kind` can score `example`: classification reads one pair, a choice task two or more."""
    return len(example.pairs) >= 2 if kind == "choice" else len(example.pairs) == 1


def answerable(kinds: list[str], examples: list[Example]) -> Tensor:
    """[N, T] which entries (of task kinds `kinds`) can score each example; a choice entry may take a one-candidate row no other can."""
    allowed = torch.tensor([[can_answer(kind, ex) for kind in kinds] for ex in examples], dtype=torch.bool)
    choice = torch.tensor([kind == "choice" for kind in kinds], dtype=torch.bool)
    orphans = ~allowed.any(1)
    allowed[orphans] = choice & torch.tensor([len(ex.pairs) == 1 for ex in examples], dtype=torch.bool)[orphans].unsqueeze(1)
    return allowed


def route_readings(backbone: Backbone, readings: Sequence[Mapping[str, Example]], contenders: Mapping[str, Contender], router: str,
                   where, batch_size: int = 64, precision: Callable[[tuple[str, ...]], Tensor] | None = None,
                   cache: dict | None = None, keys: Sequence | None = None) -> list[tuple[str, float]]:
    """The entry each row goes to among those reading it, and its routing score (`route_features`): each entry compared
    with the row as it reads it (`readings[i]`: entry -> its reading of row i; ties go to the first).

    Rows read by the same entries are routed together; which entries can score a row is judged on its first
    reading (`answerable`, as `crpt bank predict` and the server check a row). `precision` gives the Mahalanobis
    router's shared precision for a set of readers (default: computed from their states); `cache` and `keys` as
    for `reading_features`.
    """
    features = reading_features(backbone, readings, {name: c.featurization for name, c in contenders.items()}, where,
                                batch_size, cache, keys)
    groups: dict[tuple[str, ...], list[int]] = {}  # the entries reading a row -> its rows
    for i, reading in enumerate(readings):
        groups.setdefault(tuple(reading), []).append(i)
    out: list[tuple[str, float]] = [("", 0.0)] * len(readings)
    for readers, rows in groups.items():
        views = [torch.stack([features[i][name] for i in rows]) for name in readers]
        for name, view in zip(readers, views):
            if contenders[name].state["mean"].shape[0] != view.shape[1]:  # other features than this backbone computes
                raise BankError(f"{where / name / ROUTE_FILE}: route state of {contenders[name].state['mean'].shape[0]} features, "
                                f"this backbone's inputs have {view.shape[1]}; the entry was made by another version")
        allowed = answerable([contenders[name].kind for name in readers], [next(iter(readings[i].values())) for i in rows])
        shared = precision(readers) if precision is not None and router == "mahalanobis" else None
        chosen, scores = route_features(views, [contenders[name].state for name in readers], router, allowed, shared)
        for i, t, score in zip(rows, chosen, scores):
            out[i] = (readers[t], score)
    return out


@dataclass
class Routed:
    """One example routed: the entry chosen, the router's score for it (`route_features`; the confidence router's is
    `confidence`: a ranking of inputs, not a probability that the route is right), and that entry's answer."""

    task: str
    routing_score: float
    index: int


def routable(bank: PromptBank, names: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The entries (of `names`, default all) that hold route state, and those that do not (made before routing existed)."""
    names = bank.tasks() if names is None else names
    fingerprints = {}
    with_state, without = [], []
    for name in names:
        entry = bank.get(name)
        fingerprints[name] = entry.meta.get("backbone", {}).get("fingerprint")
        (with_state if entry.route is not None else without).append(name)
    if len(set(fingerprints.values())) > 1:
        first = names[0]
        other = next(n for n in names if fingerprints[n] != fingerprints[first])
        raise BankError(f"{bank.path}: entries {first!r} and {other!r} were made on different backbones; "
                        "a router compares their inputs on one backbone, so this bank cannot be routed (give --task)")
    return with_state, without


def route(bank: PromptBank, examples: list[Example], backbone: Backbone, router: str = "mahalanobis",
          names: list[str] | None = None, readings: dict[str, list[Example]] | None = None, bf16: bool = True) -> list[Routed]:
    """Route every example to one of the bank's entries (default all of them) and answer it with that entry.

    `readings` holds the same inputs as each entry's own task reads them, where tasks read one row
    differently (a seq2seq or decoder task's source names the task, its candidates are its labels): each
    entry is compared with (`route_readings`), answers, and is sure of its own reading; without them every
    entry reads `examples`, on which answerability is judged. `bf16` False scores the answers in fp32; the
    route features keep each entry's recorded precision, which its route state was built at.
    """
    def read_by(t: int, i: int) -> Example:
        return readings[names[t]][i] if readings else examples[i]

    names, skipped = routable(bank, names)
    if not names:
        raise BankError(f"{bank.path}: no entry holds route state ({', '.join(skipped)} were made before routing existed); "
                        "give the task with --task, or add the state with crpt bank index-routes BANK")
    contenders = bank_contenders(bank, names)
    allowed = answerable([contenders[n].kind for n in names], examples)
    unanswerable = (~allowed.any(1)).nonzero().flatten().tolist()
    if unanswerable:
        raise BankError(f"example {examples[unanswerable[0]].uid!r}: no entry of {bank.path} can read it "
                        f"({len(examples[unanswerable[0]].pairs)} text pairs; entries: {', '.join(names)})")
    if router == "confidence":  # every entry answers every example it can read: all in one stream of mixed batches
        pairs = allowed.nonzero().tolist()
        scored = bank_option_scores(bank, [read_by(t, i) for i, t in pairs], [names[t] for _, t in pairs], backbone, bf16=bf16)
        best: dict[int, tuple[float, int, int]] = {}
        for (i, t), s in zip(pairs, scored):
            sure = confidence(s, float(contenders[names[t]].state["temperature"]))
            if i not in best or sure > best[i][0]:
                best[i] = (sure, t, int(s.argmax()))
        return [Routed(names[best[i][1]], best[i][0], best[i][2]) for i in range(len(examples))]
    rows = [{name: read_by(t, i) for t, name in enumerate(names)} for i in range(len(examples))]
    chosen = route_readings(backbone, rows, contenders, router, bank.path)
    answers = bank_option_scores(bank, [row[name] for row, (name, _) in zip(rows, chosen)], [name for name, _ in chosen],
                                 backbone, bf16=bf16)  # tasks mixed in every batch
    return [Routed(name, score, int(a.argmax())) for (name, score), a in zip(chosen, answers)]


def readers_of(bank: PromptBank, names: list[str], task) -> list[str]:
    """The entries of `names` whose task's parser reads rows in `task`'s format (as `crpt bank predict` offers a row)."""
    return [n for n in names if task_from_meta(bank.get(n).meta, bank.path / n).reads(task)]


def state_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of a route state's tensors (fp32), without the safetensors header."""
    return sum(t.numel() * t.element_size() for t in state.values())
