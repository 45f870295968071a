"""crpt's failures: checked before a run folder is written, one line and exit 2 (a traceback only under --debug),
one writer per run folder, and backbones read from safetensors only.

Each test was run against the commit before these fixes (issue 26, items 3, 4, 5 and 11) and failed there;
the comment on each says how.
"""

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash import ENV, REPO, snapshot
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.cli import main
from continual_rpt.locks import locked


def crpt(capsys, *argv) -> tuple[int, str]:
    """Run `crpt ARGV` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *expected: str) -> str:
    """The one error line of a failed command (exit 2, no traceback), checked to hold every `expected` text."""
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()  # transformers' "Loading weights" bar may come first, in a child process
    assert lines and lines[-1].startswith("crpt: error: ") and sum(line.startswith("crpt: ") for line in lines) == 1, err[-2000:]
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def bad_utf8(path: Path, line: int) -> None:
    """Put a byte that is not UTF-8 in the middle of line `line` of `path`."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:20] + b"\xff" + lines[line - 1][20:]
    path.write_bytes(b"\n".join(lines))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """Copies of the CB data and of the tiny BERT (tests break and move them), and a one-task stream over both."""
    root = tmp_path_factory.mktemp("cli-errors")
    data = root / "data"
    shutil.copytree(superglue_dir / "CB", data / "CB")
    backbone = shutil.copytree(tiny_bert_dir, root / "bert")
    return {"root": root, "data": data, "backbone": backbone, "stream": write_stream(root, backbone, data, ["CB"])}


class Broken:
    """One of the faults a run must find before it writes: invalid UTF-8 in the last split read, no backbone, no GPU."""

    def __init__(self, setup, case: str) -> None:
        self.setup, self.case = setup, case
        self.train = setup["data"] / "CB" / "train.jsonl"

    def __enter__(self) -> list[str]:
        """Break it; the extra crpt options it needs and the texts its error line must hold."""
        if self.case == "utf8":
            self.original = self.train.read_bytes()
            bad_utf8(self.train, 7)
            return [], [f"{self.train}:7: not UTF-8", "column 21"]
        if self.case == "backbone":
            self.setup["backbone"].rename(self.setup["backbone"].with_name("bert-away"))
            return [], [str(self.setup["backbone"])]
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        return ["--device", "cuda"], ["device 'cuda'", "no cuda device"]

    def __exit__(self, *exc) -> None:
        if self.case == "utf8":
            self.train.write_bytes(self.original)
        elif self.case == "backbone":
            self.setup["backbone"].with_name("bert-away").rename(self.setup["backbone"])


@pytest.mark.parametrize("case", ["utf8", "backbone", "device"])
def test_a_refused_run_writes_no_folder(setup, tmp_path, capsys, case):
    # Fails on main: stream.json and log.txt were written first (and --device cuda raised a RuntimeError; invalid UTF-8
    # was reported at a byte offset).
    out = tmp_path / "run"
    with Broken(setup, case) as (options, expected):
        code, err = crpt(capsys, "run", setup["stream"], "--out", out, "--no-progress", *options)
    one_line_error(code, err, *expected)
    assert not out.exists()


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished run of the stream."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(setup["stream"]), "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_next_plain_run_after_a_refused_one_is_not_refused(setup, tmp_path, capsys):
    # Fails on main: the refused run had written stream.json, so the next one was refused ("already holds a run").
    out = tmp_path / "run"
    with Broken(setup, "utf8"):
        assert crpt(capsys, "run", setup["stream"], "--out", out, "--no-progress")[0] == 2
    code, err = crpt(capsys, "run", setup["stream"], "--out", out, "--no-progress")
    assert code == 0, err
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()  # the lock file goes with its holder


@pytest.mark.parametrize("case", ["utf8", "backbone"])
def test_a_refused_resume_leaves_the_folder_byte_for_byte(setup, finished, capsys, case):
    # Fails on main: log.txt got "resume stream …" before the data and the backbone were read.
    before = snapshot(finished, skip=())
    with Broken(setup, case) as (options, expected):
        code, err = crpt(capsys, "run", setup["stream"], "--out", finished, "--resume", "--no-progress", *options)
    one_line_error(code, err, *expected)
    assert snapshot(finished, skip=()) == before


def test_invalid_utf8_in_a_stream_file_names_its_line(setup, tmp_path, capsys):
    # Fails on main: "'utf-8' codec can't decode byte 0xff in position 74", naming neither the file nor the line.
    stream = tmp_path / "stream.yaml"
    stream.write_bytes(setup["stream"].read_bytes())
    bad_utf8(stream, 3)
    code, err = crpt(capsys, "run", stream, "--out", tmp_path / "run", "--no-progress")
    one_line_error(code, err, f"{stream}:3: not UTF-8")
    assert not (tmp_path / "run").exists()


def test_debug_prints_the_traceback_before_the_line(setup, tmp_path, capsys):
    # Fails on main: there was no --debug option (argparse exits).
    with Broken(setup, "utf8") as (options, expected):
        code, err = crpt(capsys, "--debug", "run", setup["stream"], "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and err.startswith("Traceback") and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("crpt: error: ")


def test_a_second_run_on_a_held_folder_fails_at_once_naming_the_holder(setup, finished):
    # Fails on main (no lock on a run folder): the second process went ahead, resumed the run and rewrote its results (exit 0).
    # A real second process; this test process holds the folder's lock as a live run does (locks.locked).
    before = snapshot(finished, skip=())
    with locked(finished, remove=True):
        proc = subprocess.run([sys.executable, "-m", "continual_rpt", "run", str(setup["stream"]), "--out", str(finished), "--resume",
                               "--no-progress"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
        one_line_error(proc.returncode, proc.stderr, f"pid {os.getpid()}", str(finished))
    assert snapshot(finished, skip=()) == before  # nothing written: the lock came before any work


def _file_size_limit(limit: int):
    """For a child process: files may not grow past `limit` bytes; a write past it fails with EFBIG instead of killing it."""
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def test_a_failed_safetensors_write_is_one_line(setup, tiny_bert_dir, tmp_path):
    # Fails on main: safetensors' SafetensorError ("File too large") came out as a traceback with exit 1.
    # The mechanism is the kernel's: RLIMIT_FSIZE makes the child's write(2) past 6,000 bytes fail (EFBIG, as ENOSPC does on
    # a full disk), and the first file that large this run writes is its entry's prompt.safetensors (64 x 32 fp32, 8 KiB):
    # stream.json, the bank index and the entry's JSON files stay under 2 KiB, state.json (22 KiB) comes after the entry.
    stream = write_stream(tmp_path, setup["backbone"], setup["data"], ["CB"], prompt={"n_tokens": 64, "bottleneck": 8},
                          train={"epochs": 1, "batch_size": 8, "max_length": 160, "bf16": False})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "continual_rpt", "run", str(stream), "--out", str(out), "--no-progress"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(6000))
    one_line_error(proc.returncode, proc.stderr, "safetensors", "File too large")
    assert (out / "stream.json").is_file() and not (out / "bank" / "CB").exists()  # it got as far as the entry, which is not there


class Payload:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("checkpoint", ["payload", "weights"])
def test_a_pickle_only_backbone_is_refused_and_never_unpickled(setup, tiny_bert_dir, tmp_path, capsys, checkpoint):
    # Fails on main: "weights" (a plain state_dict pickle) loaded; "payload" raised UnpicklingError (a traceback, exit 1).
    folder = tmp_path / "pickled-bert"
    shutil.copytree(tiny_bert_dir, folder)
    weights = load_backbone(str(tiny_bert_dir)).model.state_dict()
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    if checkpoint == "payload":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
        pickle.loads(pickle.dumps(Payload(tmp_path / "control")))
        assert (tmp_path / "control").exists()  # the payload is live, so the marker's absence below means "never unpickled"
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds no safetensors weights .*pytorch_model.bin.*pickle checkpoints are refused"):
        load_backbone(str(folder))
    out = tmp_path / "run"
    code, err = crpt(capsys, "run", write_stream(tmp_path, folder, setup["data"], ["CB"]), "--out", out, "--no-progress")
    one_line_error(code, err, str(folder), "no safetensors weights")
    assert not out.exists() and not marker.exists()


def test_a_backbone_only_the_bank_names_is_warned_of_before_loading(setup, finished, capsys):
    # Fails on main: no warning; the bank alone chose which model loaded.
    bank, rows, away = finished / "bank", setup["data"] / "CB" / "val.jsonl", setup["backbone"].with_name("bert-away")
    code, err = crpt(capsys, "bank", "predict", bank, "CB", "--input", rows)
    assert code == 0 and f"warning: loading backbone {str(setup['backbone'])!r}, named by the bank's entries" in err
    code, err = crpt(capsys, "bank", "predict", bank, "CB", "--input", rows, "--backbone", setup["backbone"])
    assert code == 0 and "warning" not in err
    setup["backbone"].rename(away)  # the warning comes before loading: it is there even when loading fails
    try:
        code, err = crpt(capsys, "bank", "predict", bank, "CB", "--input", rows)
    finally:
        away.rename(setup["backbone"])
    warning, error = err.strip().splitlines()
    assert code == 2 and "warning: loading backbone" in warning and error.startswith("crpt: error: ")
