"""What the soft constraints share: a mask that gives way where it would leave a row nothing to draw."""

from __future__ import annotations

import torch


def leaves_something(row: torch.Tensor, ban: torch.Tensor) -> bool:
    """Masking `ban` in the logits `row` would leave at least one id to draw."""
    return bool(torch.isfinite(row.masked_fill(ban, float("-inf"))).any())


def ban_unless_nothing_left(row: torch.Tensor, ban: torch.Tensor) -> None:
    """Mask `ban` in `row` in place, unless that would leave nothing (then another mask decides)."""
    if leaves_something(row, ban):
        row.masked_fill_(ban, float("-inf"))
