"""Stable ids and perceptual-hash distance, shared by mining and `instruct` (standard library only)."""

from __future__ import annotations

import hashlib


def stable_hash(*parts: str) -> str:
    """32 hex digits naming `parts` (pair ids, triplet ids): the same parts always give the same id."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def hamming(a: int, b: int) -> int:
    """Bits in which two 64-bit perceptual hashes differ."""
    return (a ^ b).bit_count()
