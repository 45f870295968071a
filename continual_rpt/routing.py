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

One featurization: every caller (a run's task-free scores, `crpt bank predict` without a task,
experiments/routing.py) featurizes an input as each entry's route state says it featurized that
entry's training inputs (`Featurization.of_entry`): truncated to the entry's max_length, in bf16 or
fp32 as it was, with the pooling it was built with. Entries stored before the featurization was
recorded were built at their stored config's train.max_length (and train.bf16), which is what they
fall back to. In a bank whose entries were featurized differently (tasks with different
max_length), an input is featurized once per distinct featurization and compared with each entry
under that entry's own: its distance to entry t is measured from its features as t's state would
have summarised them (the Mahalanobis router's shared covariance still pools every state).

Routers:
    mahalanobis  nearest task mean under one covariance shared by the tasks: the count-weighted mean of
                 each task's low-rank-plus-diagonal covariance, shrunk towards its mean variance
    prototype    nearest task mean by cosine similarity
    confidence   every entry answers with its own prompt and head; the one most sure of its answer
                 (temperature-scaled, normalised for its number of options) wins: one forward pass per entry
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from continual_rpt.backbones import Backbone, Features
from continual_rpt.bank import ROUTE_FILE, BankError, Entry, PromptBank
from continual_rpt.evaluation import bank_option_scores, option_scores, per_example, predict_from_bank
from continual_rpt.tasks import DataError, Example, Task, TaskData, task_from_meta

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

    def features(self, backbone: Backbone, examples: list[Example], where, batch_size: int = 64) -> Tensor:
        """The route features of `examples` under this featurization, [N, D]; refused where `backbone` cannot repeat it."""
        if self.version != FEATURE_VERSION:
            raise BankError(f"{where}: route state of feature version {self.version}, this library computes version "
                            f"{FEATURE_VERSION}; the entry was made by another version")
        pooling = getattr(backbone, "pooling", None) or "none"
        if self.pooling != pooling and "none" not in (self.pooling, pooling):
            raise BankError(f"{where}: route state built with {self.pooling} pooling, the backbone pools by {pooling}")
        return input_features(backbone, backbone.featurize(examples, self.max_length), batch_size, self.bf16)


def entry_features(entries: dict[str, Entry], where, examples: list[Example], backbone: Backbone,
                   cache: dict | None = None) -> dict[str, Tensor]:
    """Every entry's view of `examples`: their features under its own featurization, computed once per distinct one.

    `cache` (optional) keeps them between calls, keyed by featurization: pass one per list of examples.
    """
    cache = {} if cache is None else cache
    out = {}
    for name, entry in entries.items():
        f = Featurization.of_entry(entry, where / name / ROUTE_FILE)
        if f not in cache:
            cache[f] = f.features(backbone, examples, where / name / ROUTE_FILE)
        if entry.route["mean"].shape[0] != cache[f].shape[1]:  # other features than this backbone computes (another library version)
            raise BankError(f"{where / name / ROUTE_FILE}: route state of {entry.route['mean'].shape[0]} features, "
                            f"this backbone's inputs have {cache[f].shape[1]}; the entry was made by another version")
        out[name] = cache[f]
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

    Each entry compares the examples featurized as its route state says (`Featurization.of_entry`).
    `readings` holds the same inputs as each entry's own task reads them, where tasks read one row
    differently (a seq2seq or decoder task's source names the task, its candidates are its labels): an
    entry answers, and is sure of, its own reading; `examples` alone are what is routed. `bf16` False scores the
    answers in fp32; the route features keep each entry's recorded precision, which its route state was built at.
    """
    def read_by(t: int, i: int) -> Example:
        return readings[names[t]][i] if readings else examples[i]

    names, skipped = routable(bank, names)
    if not names:
        raise BankError(f"{bank.path}: no entry holds route state ({', '.join(skipped)} were made before routing existed); "
                        "give the task with --task, or add the state with crpt bank index-routes BANK")
    entries = {name: bank.get(name) for name in names}
    allowed = answerable([entries[n].meta.get("kind") for n in names], examples)
    unanswerable = (~allowed.any(1)).nonzero().flatten().tolist()
    if unanswerable:
        raise BankError(f"example {examples[unanswerable[0]].uid!r}: no entry of {bank.path} can read it "
                        f"({len(examples[unanswerable[0]].pairs)} text pairs; entries: {', '.join(names)})")
    if router == "confidence":  # every entry answers every example it can read: all in one stream of mixed batches
        pairs = allowed.nonzero().tolist()
        scored = bank_option_scores(bank, [read_by(t, i) for i, t in pairs], [names[t] for _, t in pairs], backbone, bf16=bf16)
        best: dict[int, tuple[float, int, int]] = {}
        for (i, t), s in zip(pairs, scored):
            sure = confidence(s, float(entries[names[t]].route["temperature"]))
            if i not in best or sure > best[i][0]:
                best[i] = (sure, t, int(s.argmax()))
        return [Routed(names[best[i][1]], best[i][0], best[i][2]) for i in range(len(examples))]
    x = entry_features(entries, bank.path, examples, backbone)
    indices, scores = route_features([x[n] for n in names], [entries[n].route for n in names], router, allowed)
    answers = bank_option_scores(bank, [read_by(t, i) for i, t in enumerate(indices)], [names[t] for t in indices],
                                 backbone, bf16=bf16)  # tasks mixed in every batch
    return [Routed(names[t], score, int(a.argmax())) for t, score, a in zip(indices, scores, answers)]


def readers_of(bank: PromptBank, names: list[str], task) -> list[str]:
    """The entries of `names` whose task's parser reads rows in `task`'s format (as `crpt bank predict` offers a row)."""
    return [n for n in names if task_from_meta(bank.get(n).meta, bank.path / n).reads(task)]


def state_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of a route state's tensors (fp32), without the safetensors header."""
    return sum(t.numel() * t.element_size() for t in state.values())



def answer_as(task, other_meta: dict, index: int) -> int | None:
    """Another entry's answer `index`, in `task`'s terms: the same label where both tasks name it (Amazon and Yelp
    share theirs), else None, no answer: `Task.score` counts it wrong and as no other class's prediction."""
    if task.kind == other_meta["kind"] == "classification" and other_meta["label_names"][index] in task.label_names:
        return task.label_names.index(other_meta["label_names"][index])
    return None


def test_readings(tasks: dict[str, Task], home: str, d: TaskData) -> list[dict[str, Example]]:
    """Each test example of task `home` as every one of `tasks` reading its row reads it (in `tasks`' order): as
    `crpt bank predict` offers a row (`reads_row`, then `parse_inputs`); `home` reads it as the example itself."""
    parsed: dict[tuple[str, str], list[Example]] = {}  # (task, where the row was read) -> its examples

    def read(name: str, where: str, row: dict) -> list[Example]:
        if (name, where) not in parsed:
            try:
                parsed[name, where] = tasks[name].parse_inputs(row, where) if tasks[name].reads_row(row) else []
            except DataError:  # the fields are there but hold what this task cannot read
                parsed[name, where] = []
        return parsed[name, where]

    sources = [d.test_rows[example] for example in d.test]
    return [{name: example if name == home else read(name, s.where, s.row)[s.k] for name in tasks
             if name == home or len(read(name, s.where, s.row)) > s.k} for example, s in zip(d.test, sources)]


def task_free_answers(bank: PromptBank, names: list[str], data: dict, backbone: Backbone, aware: dict[str, list[int]],
                      cache: dict, router: str = "mahalanobis") -> dict[str, list[tuple[str, int]]]:
    """Every seen task's test examples answered as `crpt bank predict` without a task answers their rows: the entry
    of `names` each is routed to, and its answer (an index in that entry's own task).

    Like `route`, an example is compared with the entries reading its row (`test_readings`) as the first of
    them reads it, and the entry chosen answers its own reading: on a seq2seq or decoder backbone a task's
    source names the task and its candidates are its labels. `aware` holds each task's task-aware answers,
    reused where an example is routed home; `cache` keeps the test inputs' features per task and reading.
    """
    entries = {name: bank.get(name) for name in names}
    tasks = {name: task_from_meta(entries[name].meta, bank.path / name) for name in names}
    out = {}
    for name in names:
        readings = test_readings(tasks, name, data[name])
        firsts = [next(iter(reading.values())) for reading in readings]  # what is routed, as route() is given it
        readers = {n: entries[n] for n in names if any(n in reading for reading in readings)}
        key = (name, tuple(next(iter(reading)) for reading in readings))
        x = entry_features(readers, bank.path, firsts, backbone, cache.setdefault(key, {}))
        groups: dict[tuple[str, ...], list[int]] = {}  # the entries reading a row -> its examples, routed among them
        for i, reading in enumerate(readings):
            groups.setdefault(tuple(reading), []).append(i)
        routed = [name] * len(readings)
        for group, positions in groups.items():
            allowed = answerable([entries[n].meta["kind"] for n in group], [firsts[i] for i in positions])
            chosen, _ = route_features([x[n][positions] for n in group], [entries[n].route for n in group], router, allowed)
            for i, k in zip(positions, chosen):
                routed[i] = group[k]
        answers = list(aware[name])
        for other in names:
            mine = [i for i, n in enumerate(routed) if n == other and other != name]
            for i, answer in zip(mine, predict_from_bank(bank, other, [readings[i][other] for i in mine], backbone) if mine else []):
                answers[i] = answer
        out[name] = list(zip(routed, answers))
    return out


def task_free_scores(bank: PromptBank, names: list[str], data: dict, backbone: Backbone, aware: dict[str, list[int]],
                     cache: dict, router: str = "mahalanobis") -> tuple[dict, dict] | None:
    """Every seen task's test score from `task_free_answers` (None if an entry is missing or holds no route state):
    another entry's answer counts where both tasks name it (Amazon and Yelp share labels), else none (`answer_as`).
    Returns (scores, confusion)."""
    if not all(name in bank and bank.get(name).route is not None for name in names):
        return None  # a strategy that writes its entries only at the end of the stream, or entries made before routing
    metas = {name: bank.get(name).meta for name in names}
    scores, confusion = {}, {}
    for name, answered in task_free_answers(bank, names, data, backbone, aware, cache, router).items():
        d = data[name]
        scores[name] = d.task.score(d.test, [a if n == name else answer_as(d.task, metas[n], a) for n, a in answered])
        confusion[name] = {other: sum(n == other for n, _ in answered) for other in names}
    return scores, confusion
