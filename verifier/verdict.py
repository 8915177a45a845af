"""The verifier's decision for one inference call (K candidates -> at most one chunk)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VerifierVerdict:
    """``chosen`` is the index of the accepted candidate among all ``candidates`` drawn (over
    every round), -1 when every candidate was rejected (the queue then keeps the previous
    chunk's remainder or holds). ``scores``/``advantages``: per candidate, in draw order (empty
    when no scorer ran). ``rounds``: sampling rounds (1 + resamples). ``seconds``: wall time.
    ``override``: no candidate passed, but the hold had lasted ``max_held`` decisions, so the
    veto was lifted for this one (the envelope still checks every command)."""
    candidates: int = 1
    chosen: int = 0
    rejected: int = 0
    scores: tuple[float, ...] = ()
    seconds: float = 0.0
    advantages: tuple[float, ...] = ()
    rounds: int = 1
    reason: str = ""
    override: bool = False

    @property
    def accepted(self) -> bool:
        return self.chosen >= 0
