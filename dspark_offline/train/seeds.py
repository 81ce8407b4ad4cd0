"""Seeds derived from the run seed, so data order and anchors are functions of the inputs only."""

from __future__ import annotations

import numpy as np


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixing integers (e.g. run seed, epoch) with no accidental collisions."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )
