"""A folder of images with a label table, made from real Fashion-MNIST items: the shape of a lab's own data.

``python -m csnet.examples folder OUT`` writes OUT/img/*.png (RGB, 32 x 32 and 40 x 40 alternately, as
photos of two cameras: an item drawn in a colour on a dark background), OUT/mask/*.png (the item's pixels: 1, the background: 0) and OUT/labels.csv with,
per image, four tasks of three kinds: ``item`` (its Fashion-MNIST class, a class name), ``colour``
(a class name), ``ink`` (the share of the image the item covers: a number) and ``mask`` (the mask
file: segmentation). Colours and shifts are drawn from a seeded generator, so the folder is the same
on every machine. ``make folder-demo`` runs csnet's pipeline on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.15, 0.9, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}


def write_folder(out: Path, n: int = 1000, sizes: tuple[int, ...] = (32, 40), seed: int = 0,
                 data_root: Path | None = None) -> Path:
    """Write the folder (see the module's docstring); returns OUT. Existing files of the same names are
    replaced, so running it again gives the same folder."""
    import pandas as pd
    from torchvision.io import write_png

    from csnet.idx import FASHION, locate, read_idx

    files = locate(FASHION, data_root)
    images, labels = read_idx(files["train_images"]), read_idx(files["train_labels"])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[:n]
    colour = torch.randint(0, len(COLOURS), (n,), generator=g)
    shift = torch.rand(n, 2, generator=g)  # where the item sits, as a share of the room around it
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(exist_ok=True)
    rows = []
    palette = torch.tensor(list(COLOURS.values()))
    for k, i in enumerate(pick.tolist()):
        size = sizes[k % len(sizes)]
        item = torch.zeros(size, size)
        y, x = (shift[k] * (size - 28 + 1)).long().clamp_max(size - 28).tolist()
        item[y:y + 28, x:x + 28] = images[i].float() / 255
        noise = torch.rand(3, size, size, generator=g) * 0.15
        rgb = (item[None] * palette[colour[k]].view(3, 1, 1) + noise).clamp(0, 1)
        mask = (item > 0.2).to(torch.uint8)
        write_png((rgb * 255).round().to(torch.uint8), str(out / "img" / f"{k:05d}.png"))
        write_png(mask[None], str(out / "mask" / f"{k:05d}.png"))
        rows.append({"image": f"img/{k:05d}.png", "item": CLASSES[int(labels[i])],
                     "colour": list(COLOURS)[int(colour[k])], "ink": round(float(mask.float().mean()), 4),
                     "mask": f"mask/{k:05d}.png"})
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "folder":
        print("usage: python -m csnet.examples folder OUT", file=sys.stderr)
        return 2
    import warnings

    from csnet.errors import CsnetError

    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision")
    try:
        out = write_folder(Path(argv[1]))
    except CsnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an existing file in the way, a folder that cannot be written
        print(f"error: {e.filename or argv[1]}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: 1,000 images with labels.csv (item, colour, ink, mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
