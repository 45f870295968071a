"""The server's limits and batching options, with their defaults: one place for `create_app` and `crpt serve`'s options.

Kept free of the web stack's imports, so that `crpt --help` builds its parser without the `serve` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from continual_rpt.config_fields import Range, check_ranges, setting

POSITIVE = Range(low=0, low_open=True, words="positive")  # no rows or bytes is no server; no wait (max_wait_ms 0) is a choice


@dataclass(frozen=True)
class Limits:
    """How requests are batched and how large a request may be."""

    max_batch: Annotated[int, POSITIVE] = setting(64, "rows one batch collects from concurrent requests, of any tasks")
    # The collected rows are sorted by length and cut into forwards of this many: one forward of all 64
    # pads every row to the longest and ran 5x slower on a 2-core CPU (experiments/results/serving).
    forward_batch: Annotated[int, POSITIVE] = setting(8, "rows per forward pass within a collected batch (sorted by length first)")
    max_wait_ms: Annotated[float, Range(low=0, words="at least 0")] = setting(5.0, "longest a request waits for others to join its batch")
    max_rows: Annotated[int, POSITIVE] = setting(256, "rows one request may hold (more: HTTP 413)")
    max_body_bytes: Annotated[int, POSITIVE] = setting(1_000_000, "bytes one request body may hold (more: HTTP 413)")
    watch_interval_s: Annotated[float, POSITIVE] = setting(0.5, "seconds between looks at bank.json for new entries")

    def __post_init__(self) -> None:
        check_ranges(self, "{option} {value}: must be {words}")  # worded as the `crpt serve` option it came from
