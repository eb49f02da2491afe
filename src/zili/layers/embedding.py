"""Token embedding without nn.Embedding's random init (every value comes from the checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """input_ids [T] -> rows of `weight` [T, hidden]. When `rows_from` is set (a tied LM head's packed
    int8 copy: zili.models.quantize.serve_tied_embedding_from_head), rows come from it and `weight`
    may be empty: one copy of a large vocabulary's table instead of two."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        # (ids, dtype) -> rows [*ids.shape, hidden] in dtype
        self.rows_from: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.rows_from is not None:
            return self.rows_from(input_ids, self.weight.dtype)
        return F.embedding(input_ids, self.weight)
