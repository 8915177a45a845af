"""The verifier's decision for one inference call (K candidates -> at most one chunk)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VerifierVerdict:
    """``chosen`` is the index of the accepted candidate, -1 when every candidate was rejected
    (the queue then keeps the previous chunk's remainder or holds)."""
    candidates: int = 1
    chosen: int = 0
    rejected: int = 0
    scores: tuple[float, ...] = ()
    seconds: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.chosen >= 0
