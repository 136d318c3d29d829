"""Classification: cross-entropy over C classes; accuracy, and macro-F1 for unbalanced classes."""

from __future__ import annotations

import torch.nn.functional as F

from csnet.tasks.base import HIGHER, Task, confusion_sums, macro_mean

MISSING = -1  # a sample without a label


class Classification(Task):
    """Targets: int64 class indices, -1 where a sample has no label. The paper's tasks."""

    kind = "classification"
    metrics = {"accuracy": HIGHER, "macro_f1": HIGHER}
    primary = "accuracy"
    units = {"accuracy": "%", "macro_f1": "%"}
    delta = ("accuracy",)
    losses = ("cross-entropy",)

    def stat_size(self) -> int:
        return 1 + 3 * self.size

    def _terms(self, out, y):
        keep = y != MISSING
        loss_sum = F.cross_entropy(out, y, reduction="sum", ignore_index=MISSING)
        return loss_sum, keep.sum(), confusion_sums(out.argmax(1), y, keep, self.size).double()

    def _metrics(self, s):
        c = self.size
        correct, tp, predicted, true = s[0], s[1:1 + c], s[1 + c:1 + 2 * c], s[1 + 2 * c:]
        n = float(true.sum())
        # F1 of each class that occurs among the labels or the predictions (Sokolova & Lapalme 2009)
        seen = (predicted + true) > 0
        f1 = 2 * tp / (predicted + true).clamp_min(1)
        return {"accuracy": float(correct) / n, "macro_f1": macro_mean(f1, seen)}

    def target_shape(self, image_size):
        return ()

    def labelled(self, y):
        return y != MISSING

    def missing_value(self, y):
        return MISSING
