"""The mIoU of the reference and mmsegmentation: one confusion matrix summed over the dataset, IoU per class,
the mean over the classes that occur (in the ground truth or the prediction)."""

from __future__ import annotations

import torch

__all__ = ["ConfusionMatrix", "IGNORE_INDEX"]

#: the label of pixels that count for no class (the datasets' "void" and "don't care")
IGNORE_INDEX = 255


class ConfusionMatrix:
    """``(num_classes, num_classes)`` counts, rows = ground truth, columns = prediction, on ``device``."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Count the pixels of ``prediction`` against ``target`` (integer tensors of one shape)."""
        keep = target != self.ignore_index
        target, prediction = target[keep].long(), prediction[keep].long()
        if target.numel():  # one device sync for the four bounds
            bounds = torch.stack([target.min(), target.max(), prediction.min(), prediction.max()]).tolist()
            for what, (low, high) in (("label", bounds[:2]), ("prediction", bounds[2:])):
                if not 0 <= low <= high < self.num_classes:
                    raise ValueError(f"a {what} value outside 0..{self.num_classes - 1} (found {low}..{high}; "
                                     f"{self.ignore_index} is ignored): not this dataset's classes")
        index = target * self.num_classes + prediction
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the counts of every process of a ``torch.distributed`` run (nothing when there is none)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict:
        """mIoU over the classes that occur (in ground truth or prediction), pixel accuracy, per-class IoU/accuracy."""
        m = self.matrix.double()
        tp, gt, pred = m.diag(), m.sum(1), m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        return {
            "mIoU": float(iou.nanmean()),
            "aAcc": float(tp.sum() / m.sum().clamp(min=1)),
            "mAcc": float(acc.nanmean()),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
            "pixels": int(m.sum()),
        }
