"""What every stream of ours checks the way trio's own streams do (their contract)."""

from __future__ import annotations


def receive_size(max_bytes: int | None, default: int) -> int:
    """`receive_some`'s max_bytes as a byte count: `default` for None, TypeError for a
    non-integer, ValueError below 1 (trio.testing.check_one_way_stream asks exactly this)."""
    if max_bytes is None:
        return default
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an integer, got {type(max_bytes).__name__}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    return max_bytes
