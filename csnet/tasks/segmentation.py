"""Semantic segmentation: a class per pixel, cross-entropy over the labelled pixels; mIoU and pixel
accuracy, the metrics of the NYU-v2 and Cityscapes literature."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csnet.tasks.base import HIGHER, Task, confusion_sums, macro_mean

IGNORE = 255  # an unlabelled pixel in uint8 maps (the Cityscapes and PASCAL convention); -1 in wider ints


class Segmentation(Task):
    """Targets: integer (N, H, W) class maps; 255 (uint8) or -1 marks a pixel without a label."""

    kind = "segmentation"
    dense = True
    metrics = {"miou": HIGHER, "pixel_accuracy": HIGHER}
    primary = "miou"
    units = {"miou": "%", "pixel_accuracy": "%"}
    delta = ("miou", "pixel_accuracy")
    losses = ("cross-entropy",)

    def stat_size(self) -> int:
        return 1 + 3 * self.size

    def _terms(self, out, y):
        y = y.reshape(out.shape[0], *out.shape[2:]).long()  # (N, H, W), also from (N, 1, H, W) maps
        keep = (y >= 0) & (y != IGNORE) & (y < self.size)
        y = torch.where(keep, y, torch.full_like(y, -1))
        loss_sum = F.cross_entropy(out, y, reduction="sum", ignore_index=-1)
        return loss_sum, keep.sum(), confusion_sums(out.argmax(1), y, keep, self.size).double()

    def _metrics(self, s):
        c = self.size
        correct, tp, predicted, true = s[0], s[1:1 + c], s[1 + c:1 + 2 * c], s[1 + 2 * c:]
        union = predicted + true - tp
        # IoU of each class over the whole split; classes in neither labels nor predictions have none
        return {"miou": macro_mean(tp / union.clamp_min(1), union > 0),
                "pixel_accuracy": float(correct) / float(true.sum())}

    def labelled(self, y):
        flat = y.reshape(len(y), -1).long()
        return ((flat >= 0) & (flat != IGNORE)).any(1)

    def missing_value(self, y):
        return IGNORE if y.dtype == torch.uint8 else -1
