"""The server's limits and batching options, with their defaults: one place for `create_app` and `crpt serve`'s options.

Kept free of the web stack's imports, so that `crpt --help` builds its parser without the `serve` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Limits:
    """How requests are batched and how large a request may be."""

    max_batch: int = field(default=64, metadata={"help": "rows one batch collects from concurrent requests, of any tasks"})
    # The collected rows are sorted by length and cut into forwards of this many: one forward of all 64
    # pads every row to the longest and ran 5x slower on a 2-core CPU (experiments/results/serving).
    forward_batch: int = field(default=8, metadata={"help": "rows per forward pass within a collected batch (sorted by length first)"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for others to join its batch"})
    max_rows: int = field(default=256, metadata={"help": "rows one request may hold (more: HTTP 413)"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "bytes one request body may hold (more: HTTP 413)"})
    watch_interval_s: float = field(default=0.5, metadata={"help": "seconds between looks at bank.json for new entries"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name != "max_wait_ms"):  # no wait is a choice; no rows or bytes is not
                raise ValueError(f"--{f.name.replace('_', '-')} {value}: must be {'at least 0' if f.name == 'max_wait_ms' else 'positive'}")
