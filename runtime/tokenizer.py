"""Instruction tokenizers named in the policy manifest (``inputs.tokenizer``).

``bytes``: UTF-8 bytes of the lower-cased, whitespace-normalized instruction, each byte b -> id
b + 1 (0 is padding), truncated or right-padded to ``max_len``. Deterministic, dependency-free,
identical on the learner and on the robot.
"""
from __future__ import annotations

import numpy as np


def bytes_tokenize(text: str, max_len: int) -> np.ndarray:
    norm = " ".join(text.lower().split()).encode("utf-8")[:max_len]
    ids = np.zeros(max_len, dtype=np.int64)
    ids[: len(norm)] = np.frombuffer(norm, dtype=np.uint8).astype(np.int64) + 1
    return ids


TOKENIZERS = {"bytes": bytes_tokenize}
VOCAB_SIZE = {"bytes": 257}


def tokenize(text: str, spec: dict) -> np.ndarray:
    """Tokenize ``text`` as the manifest's tokenizer spec ``{"kind": ..., "max_len": ...}`` says."""
    kind = spec.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r} in manifest; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind](text, int(spec["max_len"]))
