"""What a bank server holds (continual_rpt.serving.state): answers equal to `crpt bank predict`'s, request errors,
and a bank that grows while it serves (new entries, route state added, corrupted files refused)."""

import json
import logging
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from test_routing_featurization import t5_run  # noqa: F401 (a fixture: a finished CB, RTE run on the tiny T5)
from test_stream import write_stream

from continual_rpt.bank import HEAD_FILE, PROMPT_FILE, ROUTE_FILE, Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.evaluation import bank_option_scores
from continual_rpt.run import run_stream
from continual_rpt.serving.state import EntryScoresNaN, RowError, ServedBank, UnknownTask
from continual_rpt.streams import load_stream
from continual_rpt.tasks import read_jsonl

TASKS = ("CB", "RTE", "COPA")  # CB and RTE read the same fields: routing, not the fields, tells their rows apart
ROWS = 8  # of each task's val.jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """A finished CB, RTE, COPA run on the tiny BERT (fp32, route state stored) and a few val rows of each task."""
    tmp = tmp_path_factory.mktemp("served")
    run_stream(load_stream(write_stream(tmp, tiny_bert_dir, superglue_dir, list(TASKS))), tmp / "run", progress=False)
    rows = {}
    for name in TASKS:
        rows[name] = [json.loads(line) for line in (superglue_dir / name / "val.jsonl").read_text().splitlines()[:ROWS]]
        (tmp / name).mkdir()
        (tmp / name / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
    return tmp / "run" / "bank", rows


@pytest.fixture(scope="module")
def served(run):
    """The run's bank, served."""
    return ServedBank(run[0])


def predict_cli(tmp_path, bank, rows, *args) -> list[dict]:
    """`crpt bank predict BANK [args] --input FILE` on `rows`, through the command line's own path."""
    path, out = tmp_path / "val.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["bank", "predict", str(bank), *args, "--input", str(path), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_answers_with_the_task_given_are_crpt_bank_predicts(served, run, tmp_path):
    # Checked to fail: scoring every entry in bf16 (they were trained in fp32) puts the scores more than 1e-5 off.
    bank, rows = run
    origin = str(tmp_path / "val.jsonl")  # named as the file is: uids read "RTE/val/3", as the command line prints them
    answers = served.answer([served.parse(name, rows[name], origin) for name in TASKS])  # one batch, tasks mixed
    for name, mine in zip(TASKS, answers):
        cli = predict_cli(tmp_path, bank, rows[name], name)
        assert [(a.uid, a.prediction, a.index, a.task, a.routing_score) for a in mine] == \
            [(c["uid"], c["prediction"], c["index"], name, None) for c in cli]
        examples = read_jsonl(served.snapshot.entries[name].task, tmp_path / "val.jsonl")
        expected = bank_option_scores(PromptBank.open(bank), examples, [name] * len(examples), served.backbone)
        assert [a.scores == pytest.approx(s[: len(a.options)].tolist(), abs=1e-5) for a, s in zip(mine, expected)] == [True] * ROWS
    assert [a.options for a in answers[0][:1]] == [["entailment", "contradiction", "neutral"]]
    assert answers[2][0].options == [rows["COPA"][0]["choice1"], rows["COPA"][0]["choice2"]]


def test_routed_answers_are_crpt_bank_predicts_row_by_row(served, run, tmp_path):
    # Checked to fail: answering each routed row with the first entry that reads it, unrouted, gives RTE rows to CB.
    bank, rows = run
    mixed = [row for i in range(ROWS) for row in (rows["CB"][i], rows["COPA"][i], rows["RTE"][i])]
    cli = predict_cli(tmp_path, bank, mixed)
    origin = str(tmp_path / "val.jsonl")
    one, split = served.answer([served.parse(None, mixed, origin)]), served.answer([served.parse(None, mixed[:5], origin),
                                                                                  served.parse(None, mixed[5:], origin)])
    assert [len(a) for a in split] == [5, len(mixed) - 5]  # split back per request, in order
    assert [a.row for a in one[0]] == [c["line"] - 1 for c in cli] == [a.row for a in split[0]] + [a.row + 5 for a in split[1]]
    for answers in (one[0], split[0] + split[1]):
        assert [(a.task, a.uid, a.prediction, a.index) for a in answers] == [(c["task"], c["uid"], c["prediction"], c["index"]) for c in cli]
        assert [a.routing_score for a in answers] == pytest.approx([c["routing_score"] for c in cli], abs=1e-5)
    assert {a.task for a in one[0]} >= {"CB", "RTE", "COPA"}  # both CB and RTE answer some premise/hypothesis rows


def test_the_confidence_router_answers_as_crpt_bank_predict_does(run, tmp_path):
    # Checked to fail: keeping the least sure entry's answer instead of the surest one's.
    bank, rows = run
    mixed = [row for i in range(ROWS) for row in (rows["CB"][i], rows["COPA"][i], rows["RTE"][i])]
    cli = predict_cli(tmp_path, bank, mixed, "--router", "confidence")
    served = ServedBank(bank, router="confidence")
    answers = served.answer([served.parse("CB", rows["CB"]), served.parse(None, mixed, str(tmp_path / "val.jsonl"))])[1]
    assert [(a.task, a.uid, a.prediction, a.index) for a in answers] == [(c["task"], c["uid"], c["prediction"], c["index"]) for c in cli]
    assert [a.routing_score for a in answers] == pytest.approx([c["routing_score"] for c in cli], abs=1e-5)


def test_each_entry_is_scored_in_the_precision_it_was_trained_in(run, served, tmp_path):
    # Checked to fail: scoring a batch in fp32 when any of its entries was trained in fp32 (CB16's scores beside RTE's change).
    source, rows = run
    bank = copy_bank(source, tmp_path / "bank", ["RTE"])
    cb = Entry.from_pretrained(source / "CB")
    bank.add("CB16", Entry(cb.prompt, cb.head, cb.meta, {**cb.config, "train": {**cb.config["train"], "bf16": True}}, cb.metrics, cb.route))
    mixed = ServedBank(tmp_path / "bank")
    alone, both = mixed.answer([mixed.parse("CB16", rows["CB"])]), mixed.answer([mixed.parse("CB16", rows["CB"]), mixed.parse("RTE", rows["RTE"])])
    cli = predict_cli(tmp_path, tmp_path / "bank", rows["CB"], "CB16")  # the rows are in tmp_path / "val.jsonl"
    examples = read_jsonl(mixed.snapshot.entries["CB16"].task, tmp_path / "val.jsonl")
    bf16 = bank_option_scores(PromptBank.open(tmp_path / "bank"), examples, ["CB16"] * ROWS, mixed.backbone)  # as bank predict scores it
    assert [a.index for a in alone[0]] == [c["index"] for c in cli] and [a.scores for a in alone[0]] == [s.tolist() for s in bf16]
    assert both[0] == alone[0]  # beside an fp32 entry's rows, still in bf16
    assert both[1] == served.answer([served.parse("RTE", rows["RTE"])])[0]  # RTE (fp32) as in the all-fp32 bank, bit for bit


def test_an_unknown_task_names_the_known_ones(served):
    # Checked to fail: a message that says "it serves other tasks".
    with pytest.raises(UnknownTask, match="no task 'BoolQ'.*serves CB, RTE, COPA"):
        served.parse("BoolQ", [{"idx": 0, "question": "q", "passage": "p"}])
    with pytest.raises(UnknownTask, match="serves CB, RTE, COPA"):
        served.task("nope")
    assert served.task("RTE")["labels"] == ["entailment", "not_entailment"] and served.task("COPA")["routed"]


@pytest.mark.parametrize("task, row, field", [
    ("RTE", {"idx": 1, "premise": "A cat sat."}, "hypothesis"),  # a field missing
    ("RTE", {"idx": 1, "premise": "A cat sat.", "hypothesis": 3}, "hypothesis"),  # of the wrong type
    ("RTE", {"idx": 1, "premise": "A cat sat.", "hypothesis": "It sat.", "label": "maybe"}, "label"),  # a label RTE has not
    (None, {"idx": 1, "question": "Why?"}, "premise"),  # no entry reads it: the nearest one's first missing field
    (None, {"idx": 1, "premise": "A cat sat.", "hypothesis": ["It sat."]}, "hypothesis"),  # its readers cannot parse it
])
def test_a_row_none_can_read_names_its_index_and_field(served, run, task, row, field):
    # Checked to fail: a RowError without the field the parser's message names (4 cases), or without the nearest entry's (1).
    rows = [run[1]["RTE"][0], row]
    with pytest.raises(RowError, match=f"row 1, field '{field}'") as err:
        served.parse(task, rows)
    assert (err.value.row, err.value.field) == (1, field)


def copy_bank(source, target, names, routed=True):
    """A new bank at `target` holding `source`'s entries `names`, added by the bank's writer (without route state: routed=False)."""
    bank = PromptBank.open(target, create=True)
    for name in names:
        entry = Entry.from_pretrained(source / name)
        bank.add(name, entry if routed else Entry(entry.prompt, entry.head, entry.meta, entry.config, entry.metrics))
    return bank


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_the_bank_grows_while_it_serves_and_old_answers_stay_bit_identical(run, tmp_path, caplog):
    # Checked to fail: reloading every listed entry on each refresh (refresh names CB and RTE again, the `is` checks);
    # an index read only at start (COPA is never served).
    source, rows = run
    copy_bank(source, tmp_path / "bank", ["CB", "RTE"])
    served = ServedBank(tmp_path / "bank")
    old = [served.parse("CB", rows["CB"]), served.parse("RTE", rows["RTE"]), served.parse(None, rows["RTE"] + rows["CB"])]
    before = served.answer(old)
    prompts = {name: served.snapshot.entries[name].answerer.prompt for name in ("CB", "RTE")}
    assert served.refresh() == [] and served.generation == 1  # bank.json unchanged: nothing re-read
    with pytest.raises(RowError, match="row 0, field 'hypothesis': no served entry can read"):  # COPA rows: premise, no hypothesis
        served.parse(None, rows["COPA"])

    during, stop = [], threading.Event()

    def keep_answering():  # a worker thread answering the old tasks while the bank grows (bounded: 100 batches)
        for _ in range(100):
            during.append(served.answer(old))
            if stop.wait(0.05):  # leaves the writer some of the CPU
                return

    worker = threading.Thread(target=keep_answering)
    worker.start()
    add = "import sys; from continual_rpt.bank import Entry, PromptBank; PromptBank.open(sys.argv[1]).add(sys.argv[3], Entry.from_pretrained(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", add, str(tmp_path / "bank"), str(source / "COPA"), "COPA"], check=True, timeout=120)
    assert served.refresh() == ["COPA"] and served.generation == 2
    PromptBank.open(tmp_path / "bank").add("CB2", Entry.from_pretrained(source / "CB"))
    flip_a_byte(tmp_path / "bank" / "CB2" / HEAD_FILE)  # after the index listed it
    with caplog.at_level(logging.ERROR, logger="continual_rpt.serving.state"):
        assert served.refresh() == [] and served.generation == 2
    stop.set()
    worker.join(timeout=120)
    assert f"{tmp_path / 'bank' / 'CB2' / HEAD_FILE}: changed since it was stored (checksum mismatch)" in caplog.text
    with pytest.raises(UnknownTask, match="CB2' \\(its entry is refused: .*\\(checksum mismatch\\)\\); it serves CB, RTE, COPA"):
        served.parse("CB2", rows["CB"])

    after = served.answer(old)
    assert during and all(answers == before for answers in during) and after == before  # every float, bit for bit
    assert all(served.snapshot.entries[name].answerer.prompt is prompts[name] for name in prompts)  # the same loaded tensors
    copa = served.answer([served.parse("COPA", rows["COPA"]), served.parse(None, rows["COPA"])])
    assert [a.task for a in copa[1]] == ["COPA"] * ROWS and [a.index for a in copa[1]] == [a.index for a in copa[0]]


def test_route_state_added_to_a_served_entry_makes_it_routed_with_the_same_prompt(run, tmp_path):
    # Checked to fail: a refresh that skips every entry it serves already never reloads RTE with its route state.
    source, rows = run
    copy_bank(source, tmp_path / "bank", ["CB"])
    bank = copy_bank(source, tmp_path / "bank", ["RTE"], routed=False)  # as entries made before routing existed
    served = ServedBank(tmp_path / "bank")
    assert [t["routed"] for t in served.tasks()] == [True, False]
    given = served.parse("RTE", rows["RTE"])
    before, prompt = served.answer([given]), served.snapshot.entries["RTE"].answerer.prompt
    assert {a.task for a in served.answer([served.parse(None, rows["RTE"])])[0]} == {"CB"}  # RTE is not routed to yet

    bank.add_route("RTE", Entry.from_pretrained(source / "RTE").route)  # what crpt bank index-routes writes
    assert served.refresh() == ["RTE"] and served.generation == 2
    assert [t["routed"] for t in served.tasks()] == [True, True]
    assert served.snapshot.entries["RTE"].answerer.prompt is prompt and served.answer([given]) == before
    assert "RTE" in {a.task for a in served.answer([served.parse(None, rows["RTE"])])[0]}


def test_an_entry_whose_files_fail_their_checksums_is_refused_and_the_rest_serve(run, tmp_path, caplog):
    # Checked to fail: PromptBank.get reading entries without the index's checksums serves the flipped prompt, logging nothing.
    source, rows = run
    shutil.copytree(source, tmp_path / "bank")
    flip_a_byte(tmp_path / "bank" / "RTE" / PROMPT_FILE)
    with caplog.at_level(logging.ERROR, logger="continual_rpt.serving.state"):
        served = ServedBank(tmp_path / "bank")
    assert f"{tmp_path / 'bank' / 'RTE' / PROMPT_FILE}: changed since it was stored" in caplog.text
    assert [t["name"] for t in served.tasks()] == ["CB", "COPA"]
    with pytest.raises(UnknownTask, match="refused"):
        served.parse("RTE", rows["RTE"])
    assert {a.task for a in served.answer([served.parse(None, rows["RTE"])])[0]} == {"CB"}
    assert (tmp_path / "bank" / "RTE" / ROUTE_FILE).is_file()


def test_an_entry_whose_files_have_not_all_arrived_is_served_once_they_have(run, served, tmp_path, caplog):
    # A bank synced from elsewhere may show bank.json before an entry's folder. Checked to fail: trying an entry
    # again only when bank.json changes (RTE is never served); logging every try (two lines).
    source, rows = run
    shutil.copytree(source, tmp_path / "bank")
    (tmp_path / "bank" / "RTE").rename(tmp_path / "RTE")
    with caplog.at_level(logging.ERROR, logger="continual_rpt.serving.state"):
        synced = ServedBank(tmp_path / "bank")
        assert synced.refresh() == [] and synced.refresh() == [] and synced.generation == 1
    assert caplog.text.count("entry 'RTE' refused, not served") == 1 and "RTE/entry.json: not found" in caplog.text
    (tmp_path / "RTE").rename(tmp_path / "bank" / "RTE")
    assert synced.refresh() == ["RTE"] and synced.generation == 2
    assert synced.answer([synced.parse("RTE", rows["RTE"])]) == served.answer([served.parse("RTE", rows["RTE"])])


def test_a_t5_bank_routes_each_row_by_each_entrys_own_reading_whatever_the_entries_order(t5_run, superglue_dir, tmp_path):
    # A T5 task's reading writes the task into the source ("cb premise: ...", "rte premise: ..."). Checked to fail on
    # the previous commit, which compared every entry with the first reader's reading: all rows went to the bank's first entry.
    out, _ = t5_run
    rows = [json.loads(line) for name in ("CB", "RTE") for line in (superglue_dir / name / "val.jsonl").read_text().splitlines()[:ROWS]]
    cli = predict_cli(tmp_path, out / "bank", rows)
    routed = {}
    for order in (("CB", "RTE"), ("RTE", "CB")):
        served = ServedBank(copy_bank(out / "bank", tmp_path / "-".join(order), order).path)
        routed[order] = [(a.task, a.index) for a in served.answer([served.parse(None, rows, str(tmp_path / "val.jsonl"))])[0]]
    assert routed["CB", "RTE"] == routed["RTE", "CB"] == [(c["task"], c["index"]) for c in cli]
    assert {task for task, _ in routed["CB", "RTE"]} == {"CB", "RTE"}


def diverged(entry: Entry) -> Entry:
    """`entry` with a prompt of huge values: finite (the bank's writer stores it, its checksums pass), NaN once in the model."""
    return Entry(torch.full_like(entry.prompt, 3e38), entry.head, entry.meta, entry.config, entry.metrics, entry.route)


def test_an_entry_whose_scores_are_nan_fails_only_the_requests_it_answers(run, tmp_path):
    # One tenant's broken entry must not take down the others sharing its batch. Checked to fail on the previous
    # commit: the whole mixed batch raised NonFiniteScores.
    source, rows = run
    bank = copy_bank(source, tmp_path / "bank", ["RTE", "COPA"])
    bank.add("CB", diverged(Entry.from_pretrained(source / "CB")))
    served = ServedBank(tmp_path / "bank")
    batch = [served.parse("RTE", rows["RTE"]), served.parse("CB", rows["CB"]), served.parse("COPA", rows["COPA"]),
             served.parse(None, rows["COPA"][:3]), served.parse("CB", rows["CB"][:1])]
    answers = served.answer(batch)  # 28 rows in forwards of 8, sorted by length: CB's rows share forwards with the others
    for request in (1, 4):
        assert isinstance(answers[request], EntryScoresNaN) and answers[request].entries == ["CB"]
        assert "entry 'CB' are NaN" in str(answers[request]) and str(tmp_path / "bank") in str(answers[request])
    for request in (0, 2, 3):
        alone = served.answer([batch[request]])[0]
        assert [(a.task, a.uid, a.index, a.routing_score) for a in answers[request]] == \
            [(a.task, a.uid, a.index, a.routing_score) for a in alone]
        assert all(a.scores == pytest.approx(b.scores, abs=1e-5) for a, b in zip(answers[request], alone))
    assert [a.task for a in answers[3]] == ["COPA"] * 3
    assert isinstance(served.answer([served.parse("CB", rows["CB"])])[0], EntryScoresNaN)  # alone too
