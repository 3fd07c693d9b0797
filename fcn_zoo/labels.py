"""How labels come from logits: bilinear upsampling to the image's own size and argmax over classes, without
building the full-size score map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample_argmax", "upsample_argmax_candidates", "upsample_softmax", "bilinear_taps"]


def upsample_argmax(logits: list[torch.Tensor], size, budget_bytes: int = 64 << 20, prune: bool = True) -> torch.Tensor:
    """argmax over classes of the sum of ``logits`` (each ``(1, C, h, w)``) upsampled bilinearly to ``size``.

    Bilinear interpolation is separable: the width is upsampled for all ``h`` rows at once (small), the
    height a band of output rows at a time, each row a blend of its two nearest input rows. Only one
    band of full-size scores exists at a time (``budget_bytes``), so a 19-class 1024x2048 frame needs the
    20 MB of width-upsampled logits and one band instead of a 160 MB score map, and a TTA sum no more.
    For one set of logits (no TTA), ``prune`` first tries :func:`upsample_argmax_candidates`, which
    scores only the classes that can win at each pixel. Equal to ``F.interpolate`` up to float rounding.
    """
    height, width = int(size[0]), int(size[1])
    if prune and len(logits) == 1:
        labels = upsample_argmax_candidates(logits[0][0].float(), height, width, budget_bytes)
        if labels is not None:
            return labels
    labels = torch.empty(height, width, dtype=torch.int64, device=logits[0].device)
    for top, bottom, total in _summed_bands(logits, height, width, budget_bytes):
        labels[top:bottom] = total.argmax(0)
    return labels


def upsample_softmax(
    logits: list[torch.Tensor], size, classes: list[int] | None = None, budget_bytes: int = 64 << 20
) -> torch.Tensor:
    """Softmax over classes of the mean of ``logits`` (each ``(1, C, h, w)``) upsampled bilinearly to ``size``:
    the largest probability per pixel ``(H, W)`` (the confidence of the label :func:`upsample_argmax` gives),
    or with ``classes`` the probabilities of those classes ``(len(classes), H, W)``.

    Banded like :func:`upsample_argmax`: the full ``(C, H, W)`` probabilities never exist at once, so 150
    classes at 12 megapixels cost one band of scores (``budget_bytes``) instead of 7 GB.
    """
    height, width = int(size[0]), int(size[1])
    shape = (height, width) if classes is None else (len(classes), height, width)
    out = torch.empty(shape, dtype=torch.float32, device=logits[0].device)
    for top, bottom, total in _summed_bands(logits, height, width, budget_bytes):
        if len(logits) > 1:
            total /= len(logits)
        if classes is None:  # max softmax = 1 / sum(exp(s - max s))
            out[top:bottom] = total.sub_(total.amax(0)).exp_().sum(0).reciprocal_()
        else:
            out[:, top:bottom] = total.sub_(total.logsumexp(0)).exp_()[classes]
    return out


def _summed_bands(logits: list[torch.Tensor], height: int, width: int, budget_bytes: int):
    """Yield ``(top, bottom, scores)``: the sum of ``logits`` upsampled bilinearly to ``(height, width)``,
    for output rows ``top:bottom``, ``(C, bottom - top, width)``, one band of ``budget_bytes`` at a time. Each
    band widens only the input rows it blends (a resize of the width alone leaves each row apart, and equal),
    so a TTA sum of twelve sets costs one band's rows at a time, not twelve width-upsampled sets."""
    classes = logits[0].shape[1]
    device = logits[0].device
    taps = [bilinear_taps(lg.shape[2], height, device) for lg in logits]
    band = max(1, budget_bytes // (5 * classes * width * 4))  # the widened rows, two gathered, their blend, the sum
    for top in range(0, height, band):
        bottom = min(height, top + band)
        total = None
        for lg, (lower, upper, frac) in zip(logits, taps):
            first, last = int(lower[top]), int(upper[bottom - 1])  # the input rows this band blends
            rows = lg[:, :, first:last + 1].float()
            wide = F.interpolate(rows, size=(rows.shape[2], width), mode="bilinear", align_corners=False)[0]
            scores = torch.lerp(wide[:, lower[top:bottom] - first], wide[:, upper[top:bottom] - first],
                                frac[top:bottom].view(1, -1, 1))
            total = scores if total is None else total.add_(scores)
        yield top, bottom, total


def upsample_argmax_candidates(logits: torch.Tensor, height: int, width: int, budget_bytes: int) -> torch.Tensor | None:
    """The labels of :func:`upsample_argmax` for one ``(C, h, w)`` logits tensor, scoring at each pixel only
    the classes that can win there; ``None`` where too many can (then the banded path runs).

    Each output pixel blends the four logits vectors at the corners of its cell of the low-resolution grid
    with non-negative weights summing to 1. A class whose largest corner value is below another class's
    smallest corner value is below that class everywhere in the cell, so it cannot win there. With a
    trained model most cells have one class left, which wins at all their pixels; at the others only the
    classes left are blended, so a 150-class label map for a 12-megapixel photo costs a few scores per
    contested pixel instead of 150 per pixel (benchmarks/RESULTS.md). Equal to ``F.interpolate`` then
    argmax up to float rounding.
    """
    classes, h, w = logits.shape
    device = logits.device
    rows_lo, _, fy = bilinear_taps(h, height, device)
    cols_lo, _, fx = bilinear_taps(w, width, device)
    up_y = (torch.arange(h, device=device) + 1).clamp(max=h - 1)
    up_x = (torch.arange(w, device=device) + 1).clamp(max=w - 1)
    # the four corners of the cell whose top-left corner is (i, j): (i, j), (i, j+1), (i+1, j), (i+1, j+1)
    right, below = logits.index_select(2, up_x), logits.index_select(1, up_y)  # index_select: 5-10x faster than [idx]
    corners = torch.stack([logits, right, below, right.index_select(1, up_y)])
    floor = corners.amin(0).amax(0)  # per cell, the best worst corner of any class
    ceiling = corners.amax(0)  # per class and cell, its best corner
    count = (ceiling >= floor).sum(0)  # (h, w): how many classes can win in each cell
    k = int(count.max())
    if 4 * k * float((count > 1).float().mean()) > classes:  # about as much work as scoring every class
        return None
    # a cell with one candidate: its class wins at each of the cell's pixels; no blending there
    labels = _expand(ceiling.argmax(0), rows_lo, cols_lo)  # (height, width)
    contested_cells = count.view(-1) > 1
    contested = _expand(contested_cells.view(h, w), rows_lo, cols_lo).view(-1).nonzero().squeeze(1)  # their pixels
    if len(contested) == 0:
        return labels
    # elsewhere blend the k classes with the highest best corner: they include every class that can win.
    # In class order, so that ties go to the lowest class index as argmax over all classes would have it.
    # Chosen for the contested cells only (a trained model's are a few percent of them).
    cells = contested_cells.nonzero().squeeze(1)
    position = torch.full((h * w,), -1, dtype=torch.long, device=device)
    position[cells] = torch.arange(len(cells), device=device)
    candidates = ceiling.view(classes, -1).index_select(1, cells).topk(k, dim=0).indices.sort(dim=0).values  # (k, cells)
    values = corners.view(4, classes, -1).index_select(2, cells).gather(1, candidates.expand(4, k, len(cells)))  # (4, k, cells)
    flat = labels.view(-1)
    chunk = max(1, budget_bytes // (4 * (10 * k + 8)))
    for start in range(0, len(contested), chunk):
        pixels = contested[start:start + chunk]
        row, col = pixels // width, pixels % width
        cell = position.index_select(0, rows_lo.index_select(0, row) * w + cols_lo.index_select(0, col))
        wy, wx = fy.index_select(0, row), fx.index_select(0, col)
        v = values.index_select(2, cell)  # (4, k, n)
        upper = torch.lerp(v[0], v[1], wx)  # along the width at the cell's top row, then its bottom row
        lower = torch.lerp(v[2], v[3], wx)
        best = torch.lerp(upper, lower, wy).argmax(0)  # (n,): index into the candidates
        flat.index_copy_(0, pixels, candidates.index_select(1, cell).gather(0, best[None])[0])
    return labels


def _expand(cells: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``cells[rows][:, cols]``: each cell's value at its pixels (columns first, the smaller intermediate)."""
    return cells.index_select(1, cols).index_select(0, rows)


def bilinear_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear resampling of ``n_in`` samples to ``n_out`` (align_corners=False) as PyTorch does it: per output
    index, the lower and upper input index and the weight of the upper one."""
    y = torch.arange(n_out, device=device, dtype=torch.float64)
    src = ((y + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=n_in - 1)
    upper = (lower + 1).clamp(max=n_in - 1)
    return lower, upper, (src - lower).float()
