"""The failures `crpt` reports as one line on stderr with exit status 2, and how; anything else is a bug and keeps its traceback.

Expected: bad input or settings (ValueError: DataError, BankError, RunError, a device this machine
lacks, a pickle-only checkpoint, invalid UTF-8), the file system (OSError: a missing file, a full
disk, a folder another writer holds), safetensors files that cannot be read or written
(SafetensorError: a full disk under a safetensors write) and a training run that diverged.
"""

from __future__ import annotations

import sys
import traceback

from safetensors import SafetensorError

from continual_rpt.learner import TrainingDiverged

EXIT_STATUS = 2
EXPECTED = (ValueError, OSError, SafetensorError, TrainingDiverged)


def report(err: BaseException, debug: bool) -> int:
    """Print `err` as one line on stderr (after its traceback under --debug) and return the exit status."""
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    text = " ".join(str(err).split())  # library messages (transformers', safetensors') can span lines
    if isinstance(err, SafetensorError):  # its messages name neither the file nor the operation
        text = f"a safetensors file could not be read or written: {text}"
    print(f"crpt: error: {text or type(err).__name__}", file=sys.stderr)
    return EXIT_STATUS
