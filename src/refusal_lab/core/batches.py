"""The supervised fine-tuning batch every trainer builds: token ids and their labels, right-padded.

Right padding keeps each row's real tokens at the same positions whatever the batch's width, so
a causal model's logits on them do not depend on which rows share the batch; the labels carry
-100 (no loss) wherever the caller put it (prompt tokens) and on the padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100  # the label that takes no loss (PyTorch's cross_entropy ignore_index default)


def right_padded(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels ([rows, width] int64) of (ids, labels) rows.

    The width is the longest row, at most `max_len`; longer rows are cut there (ids and labels alike).
    """
    width = max(len(ids) for ids, _ in rows)
    if max_len is not None:
        width = min(width, max_len)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        n = min(len(ids), width)
        input_ids[i, :n], mask[i, :n] = torch.tensor(list(ids[:n])), 1
        labels[i, : min(len(lab), width)] = torch.tensor(list(lab[:width]))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
