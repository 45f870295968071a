"""Scoring each bank entry once: what a run records when it scores a task, and the check that lets later stages reuse it.

A bank entry never changes once stored (`continual_rpt.bank`) and a bank strategy answers a task
from its entry alone, so a task's test predictions after any later task are those it gave when it
was learned. With the stream's `eval: once` (the default) the run records them with the entry's
checksums and, at each later stage, verifies the entry's files against those checksums instead of
predicting again: the accuracy matrix is bit-identical to full re-scoring by construction, for
the price of hashing a few small files. A changed entry stops the run, naming the file.
"""

from __future__ import annotations

from continual_rpt.bank import INDEX_FILE, BankError, PromptBank


def scored_record(bank: PromptBank, name: str, score: dict, predictions: list[int], backbone) -> dict:
    """What later stages need to reuse task `name`'s test score: score, predictions, and the entry's files as scored."""
    return {"files": bank.files(name), "device": str(backbone.device), "score": score, "predictions": predictions}


def still_valid(bank: PromptBank, name: str, record: dict | None, backbone) -> bool:
    """Whether `record` holds task `name`'s answers now: its entry is the one scored, byte for byte, on this device."""
    if record is None or record["device"] != str(backbone.device):
        return False  # never scored, or a resumed run moved to another device, whose scores may differ in the last bits
    if bank.files(name) != record["files"]:
        raise BankError(f"{bank.path / INDEX_FILE}: entry {name!r} lists other files or checksums than when the run scored it; "
                        "entries never change: restore the bank, or start a new run")
    try:
        bank.get(name).check_backbone(backbone, bank.path / name)  # every file's sha256 against the index, and the backbone
    except BankError as err:
        raise BankError(f"{err}; the run cannot reuse the test score it recorded for entry {name!r}") from None
    return True
