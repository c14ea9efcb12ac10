"""One deterministic seed from a tuple of integers, for every seeded draw of the workload (the training stream, the
masking draws): the same integers give the same seed in every process (Python's hash() of strings does not)."""
from __future__ import annotations


def derive_seed(*parts: int) -> int:
    """FNV-1a-style mix of ``parts`` (each taken mod 2**48) into [0, 2**62)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 62)
    return h
