"""``--augment flip,crop``: random horizontal flips and padded random crops of each training batch.

The draws are per sample, from a generator seeded by (seed, epoch, step, process), so a resumed run
draws exactly what the uninterrupted one did, whatever the order of interruptions. Per-pixel targets
(class maps, depth maps) move with their images: flipped alike, cropped at the same offsets, and the
border a crop brings in is unlabelled there (255 for a class, NaN for a depth) while the image is
padded with the inputs' mean, 0 after z-scoring. Evaluation never augments. The flips and crops are
torchvision's (``transforms.v2.functional``), applied to the samples each draw picked.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from csnet.errors import UsageError
from csnet.settings import MAX_SEED
from csnet.tasks import IGNORE

AUGMENTS = ("flip", "crop")


def parse(text: str) -> tuple[str, ...]:
    """``none`` -> (); ``flip,crop`` -> ("flip", "crop"); anything else is a UsageError."""
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in AUGMENTS]
    if not names or unknown:
        raise UsageError(f"--augment takes none or a comma-separated list of {', '.join(AUGMENTS)}, got {text!r}")
    return names


def generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """The draws of one batch: a function of where the batch is in the run, not of what ran before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + step * 101 + rank) % MAX_SEED)


def augment(images: torch.Tensor, labels: dict[str, torch.Tensor], dense: set[str], names: tuple[str, ...],
            g: torch.Generator, fill=0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``images`` (B, C, H, W) floats; ``labels`` {task: targets}, the tasks in ``dense`` (B, H, W); ``fill``
    the value a crop's border takes: the inputs' mean (a number, or a tensor of one per channel), which
    z-scoring makes 0."""
    labels = dict(labels)
    if "flip" in names:
        picked = (torch.rand(images.shape[0], generator=g) < 0.5).to(images.device)
        images = torch.where(picked.view(-1, 1, 1, 1), TF.horizontal_flip(images), images)
        for t in dense:
            labels[t] = torch.where(picked.view(-1, 1, 1), TF.horizontal_flip(labels[t]), labels[t])
    if "crop" in names:
        h, w = images.shape[-2:]
        pad = max(1, min(h, w) // 8)  # 4 pixels of a 32-pixel image, as the usual CIFAR recipe
        dy = torch.randint(0, 2 * pad + 1, (images.shape[0],), generator=g).tolist()
        dx = torch.randint(0, 2 * pad + 1, (images.shape[0],), generator=g).tolist()
        mean = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
        padded = mean.expand(images.shape[0], images.shape[1], h + 2 * pad, w + 2 * pad).clone()
        padded[..., pad:pad + h, pad:pad + w] = images  # the mean where there was no pixel
        images = torch.stack([TF.crop(padded[i], dy[i], dx[i], h, w) for i in range(images.shape[0])])
        for t in dense:
            y = labels[t]
            blank = float("nan") if y.is_floating_point() else (IGNORE if y.dtype == torch.uint8 else -1)
            padded_y = TF.pad(y.unsqueeze(1), [pad], fill=blank).squeeze(1)
            labels[t] = torch.stack([TF.crop(padded_y[i], dy[i], dx[i], h, w) for i in range(y.shape[0])])
    return images, labels
