"""Reference losses for tests, built without the production target builder (model.loss): each document
of a packed row runs through the model alone, and its targets are the plain slices of its own tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_loss_sums(model, input_ids: torch.Tensor, segment_ids: torch.Tensor, labels: torch.Tensor,
                       n_mtp: int) -> tuple[list[float], list[int]]:
    """input_ids, segment_ids, labels [T] (one packed row; labels -100 where no target) ->
    (summed CE per head [1 + n_mtp], target count per head [1 + n_mtp]) over the row's documents, each
    document run alone from position 0. Head 0 is the main head (shift 1), head 1 + k MTP layer k (shift k + 2)."""
    sums, counts = [0.0] * (1 + n_mtp), [0] * (1 + n_mtp)
    for s in segment_ids.unique(sorted=True).tolist():
        where = (segment_ids == s).nonzero()[:, 0]
        assert bool((where == torch.arange(int(where[0]), int(where[-1]) + 1)).all()), "a document is contiguous"
        ids, lab = input_ids[where][None], labels[where]
        L = ids.shape[1]
        with torch.no_grad():
            out = model(ids, mtp=n_mtp > 0)
        heads = [out.logits] + list(out.mtp_logits[:n_mtp])
        for h, lg in enumerate(heads):
            shift = h + 1
            if L <= shift:
                continue
            tgt = lab[shift:]
            keep = tgt != -100
            if keep.any():
                sums[h] += float(F.cross_entropy(lg[0, : L - shift][keep].double(), tgt[keep], reduction="sum"))
                counts[h] += int(keep.sum())
    return sums, counts
