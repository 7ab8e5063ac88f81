"""Warmup-stable-decay learning rate (Wen et al. 2025), as in CaloDiT-2: linear warm-up, constant, sqrt decay."""

from __future__ import annotations

import math


def wsd(step: int, total: int, warmup_frac: float = 0.1, decay_frac: float = 0.4) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`."""
    warmup = int(warmup_frac * total)
    decay = int(decay_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    start = total - decay
    if step < start or decay == 0:
        return 1.0
    return max(0.0, 1.0 - math.sqrt((step - start + 1) / decay))
