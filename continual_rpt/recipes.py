"""Per-backbone defaults: the settings a stream gets on a backbone for every key it does not set itself.

Layering, lowest first: the dataclass defaults (the paper's T5 recipe: lr 0.3 for P and Φ, no
schedule), then this table's row for the stream's backbone, then the stream's sections, then each
task's overrides. A row is chosen on dev halves only, and names the recorded grid it came from.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, dict]] = {
    # all-MiniLM-L6-v2 (d = 384), mean pooling (pooling: auto). From experiments/results/calibration_embedded
    # and calibration_embedded_head (AG News and SST-2 dev halves, one seed; commands in experiments/README.md):
    # head_lr 1e-2 beat 1e-3 by 2-4 dev points for the head-only control and for rpt; Φ at 1e-3 while P stays
    # at 0.3 beat Φ at 0.3 by 1.5 (Adam's per-coordinate steps of 0.3 are far larger than Φ's weights, ~0.05).
    # Warm-up with linear decay and Φ's output scale matched to the embeddings moved dev by under a point: left out.
    "embedded": {
        "train": {"head_lr": 0.01, "phi_lr": 0.001},
    },
}
RECIPES["sentence-transformers/all-MiniLM-L6-v2"] = RECIPES["embedded"]  # the same weights from the hub


def recipe_for(backbone: str) -> dict[str, dict]:
    """The row of RECIPES for a backbone name (empty: the dataclass defaults apply)."""
    return RECIPES.get(backbone, {})
