"""The clean/corrupted token pair and metric shared by the patching, path-patching and AtP tests."""

from __future__ import annotations

import torch

from mechscope.locate.metrics import logit_diff


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 6] random tokens and a copy with position 2 replaced (seeded)."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (2, 6), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 100, (2,), generator=gen)
    return clean, corrupt


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, [5, 6], [7, 8])
