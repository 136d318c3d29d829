"""Dense multi-task scenes built from real Fashion-MNIST items: segmentation + depth per pixel.

A miniature of the setting of Misra et al. CVPR 2016 (NYU-v2 segmentation + normals):
one image, several dense per-pixel tasks. Here the image is a canvas (default
64x64, background intensity 0) holding 1 to ``max_items`` Fashion-MNIST items,
each at a seeded position and depth; nearer items occlude farther ones, and each
pixel is labelled with the class and the depth of the item it shows.

Conventions
-----------
* Segment: ``BACKGROUND`` (0) where no item shows, ``c + 1`` where the visible item
  has Fashion-MNIST class ``c`` (0..9), so segment maps have 11 values.
* Item pixels: after resizing, an item's pixels are those with intensity > ``ITEM_THRESHOLD``
  (10 of 255). Fashion-MNIST's own background is near zero, so this is the item's
  silhouette, less any near-black print inside it. Only those pixels are painted and
  labelled; the rest of the item's square (holes included) leaves what is behind it
  untouched, so a pixel is background in segment exactly where the image is 0.
* Depth: each item gets a depth uniform in [``NEAR``, ``FAR``) = [2.0, 8.0), in arbitrary
  "metres". Its apparent size follows depth, so depth can be read from the image:
  [2, 4) -> 28 px, [4, 6) -> 21 px, [6, 8) -> 14 px (``SCALES``; each size is resized
  once for all source images, bilinear with antialiasing, rounded to uint8).
* Tilt: an item is a plane tilted about its horizontal axis, not a flat card: pixel
  depth = item depth + slope * (row - item's centre row) / size, slope uniform in
  [-0.5, 0.5). At 64 px that moves depth by at most about +-0.11 m within an item
  (+-0.25 m at the smallest canvas, 28 px), so pixel depths lie in [1.75, 8.25].
  Background depth is NaN (invalid, as missing depth in NYU-v2).
* Occlusion: painting far to near, resolved per pixel (a z-buffer): a pixel shows the
  item whose surface is nearest at that pixel. For untilted items this is exactly
  the painter's algorithm; with tilt it also settles the rare pixels where two
  items' planes cross, so depth is always the minimum over the items covering a pixel.
* Count and presence: an item is *visible* when it shows at least
  ``min(MIN_VISIBLE, ceil(own / 2))`` pixels and at least one, where ``own`` is its
  silhouette's pixel count at its size: 20 pixels, relaxed to half the item for items
  smaller than 40 pixels (none in real Fashion-MNIST at 28 or 21 px; a few sandals and
  bags at 14 px) so a small item in full view still counts. ``count`` is the number of
  visible items and ``presence`` marks the classes of visible items only. Items below
  the threshold are still painted and keep their segment/depth labels at the pixels
  they show: those labels are true, and hiding them would make the image disagree with
  its segment map. So presence's classes all appear in segment, not always conversely,
  and count can exceed the number of present classes (two shirts: count 2, one class).
  The nearest item is always visible in practice (count >= 1 in 200,000 real scenes
  checked); only source images with no pixel above the threshold, which draw nothing,
  could leave a scene with count 0.
* Randomness: every draw comes from ``torch.Generator().manual_seed(seed)``, never the
  global generator, in a fixed order, so a call is a pure function of its arguments.
  Scene i of an n-scene call differs from scene i of an m-scene call (draws are batched).

Speed: vectorised over scenes; Python loops run over item slots and sizes (and blocks of
``BLOCK`` scenes, for memory locality), never over single scenes or pixels. 20,000 scenes
at 64x64 (max_items 4, drawn from the 60,000 training images) take about 0.75 s on 2 idle
CPU cores and 1.3 s on one (torch 2.14, a fresh process). Like any multi-threaded torch
code it slows down sharply when other processes hold the cores its threads expect.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from csnet.errors import CsnetError, UsageError
from csnet.settings import MAX_SEED

NUM_CLASSES = 10  # Fashion-MNIST item classes
BACKGROUND = 0  # segment value of background; item class c is c + 1
SIZE = 64
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

ITEM_THRESHOLD = 10  # intensity (0..255) above which a resized pixel belongs to the item
NEAR, FAR = 2.0, 8.0  # depth range of item centres, arbitrary "metres"
SCALES = (28, 21, 14)  # item side in px for the near, middle and far thirds of [NEAR, FAR)
MAX_SLOPE = 0.5  # tilt slope drawn uniformly in [-MAX_SLOPE, MAX_SLOPE)
MIN_VISIBLE = 20  # visible pixels an item needs to count (see the module docstring)
ITEM_SIDE = 28
# Scenes painted together: enough to vectorise well, few enough that the temporaries of a paste
# stay in cache and get reused by the allocator instead of being page-faulted in afresh each time.
BLOCK = 1024


# ---------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int, size: int,
           max_items: int) -> torch.Tensor:
    """The images as (N, 28, 28) uint8 on the CPU, or a UsageError naming the first bad argument."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UsageError(f"images must be a uint8 tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or tuple(images.shape[1:]) != (ITEM_SIDE, ITEM_SIDE) or images.shape[0] == 0:
        raise UsageError(f"images must have shape (N, 28, 28) or (N, 1, 28, 28) with N >= 1, got {tuple(images.shape)}")
    if (not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool
            or labels.is_floating_point() or labels.is_complex()):
        raise UsageError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (images.shape[0],):
        raise UsageError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UsageError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min().item()}..{labels.max().item()}")
    if not _is_int(n) or n < 1:
        raise UsageError(f"n (number of scenes) must be an integer >= 1, got {n!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if not _is_int(size) or size < ITEM_SIDE:
        raise UsageError(f"size must be an integer >= {ITEM_SIDE} (an item must fit), got {size!r}")
    if not _is_int(max_items) or max_items < 1:
        raise UsageError(f"max_items must be an integer >= 1, got {max_items!r}")
    return images.cpu()


# ---------------------------------------------------------------- items


def _resize(images: torch.Tensor, s: int) -> torch.Tensor:
    """uint8 (B, 28, 28) -> uint8 (B, s, s)."""
    if s == ITEM_SIDE:
        return images
    # Antialiasing (torch >= 1.11; csnet needs 2.4) keeps thin straps and soles from vanishing
    # when shrunk, where plain bilinear sampling would skip them.
    r = F.interpolate(images[:, None].float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    return r[:, 0].round().clamp(0, 255).to(torch.uint8)


def _resized(images: torch.Tensor, draws: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One (N, s, s) table per scale, filled for the source images drawn at that scale: each
    resized once however many scenes use it, and none resized that no scene uses."""
    tables = []
    for i, s in enumerate(SCALES):
        used = torch.unique(draws["which"][draws["active"] & (draws["scale"] == i)])
        table = torch.zeros(images.shape[0], s, s, dtype=torch.uint8)
        if used.numel():
            table[used] = _resize(images[used], s)
        tables.append(table)
    return tables


def _scale_index(depth: torch.Tensor) -> torch.Tensor:
    """Which of SCALES an item at this depth is drawn at (nearer = larger)."""
    third = (depth - NEAR) / (FAR - NEAR) * len(SCALES)
    return third.long().clamp(0, len(SCALES) - 1)


def _draw(n: int, n_images: int, size: int, max_items: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random choice for n scenes, (n, max_items) each; slots at or past a scene's count are unused."""
    k = torch.randint(1, max_items + 1, (n,), generator=g)
    which = torch.randint(0, n_images, (n, max_items), generator=g)
    depth = NEAR + (FAR - NEAR) * torch.rand(n, max_items, generator=g, dtype=torch.float64)
    slope = MAX_SLOPE * (2 * torch.rand(n, max_items, generator=g) - 1)
    where = torch.rand(n, max_items, 2, generator=g, dtype=torch.float64)
    scale = _scale_index(depth)
    side = torch.tensor(SCALES)[scale]
    # floor(u * (room + 1)) is uniform over 0..room, the top-left corners that keep the item inside.
    room = (size - side)[..., None].double()
    corner = (where * (room + 1)).floor().long().minimum(room.long())
    return {"active": torch.arange(max_items) < k[:, None], "which": which, "depth": depth.float(),
            "slope": slope, "scale": scale, "top": corner[..., 0], "left": corner[..., 1]}


# ---------------------------------------------------------------- painting


class _Canvas:
    """A block of scenes being painted, held flat so one item size can be pasted into many scenes at once.

    The image, segment and depth buffers are views into the caller's outputs, written in place.
    """

    def __init__(self, image: torch.Tensor, segment: torch.Tensor, depth: torch.Tensor, size: int,
                 max_items: int):
        self.n, self.size, self.max_items = image.numel() // (size * size), size, max_items
        self.image, self.segment, self.depth = image.view(-1), segment.view(-1), depth.view(-1)
        self.owner = torch.full((self.image.numel(),), -1, dtype=torch.int8 if max_items < 128 else torch.int32)
        # Kept up to date while painting: recounting the owner map at the end costs a pass per slot.
        self.shown = torch.zeros(self.n * max_items, dtype=torch.long)
        self.own = torch.zeros(self.n * max_items, dtype=torch.long)  # each item's silhouette size

    def paste(self, scenes: torch.Tensor, top: torch.Tensor, left: torch.Tensor, pixels: torch.Tensor,
              depth: torch.Tensor, slope: torch.Tensor, segment: torch.Tensor, slot: int) -> None:
        """Paste one s x s item into each of `scenes` (distinct), wherever it is nearer than what is there."""
        s = pixels.shape[-1]
        # Work on the items' own pixels only, found once: (which item, where in its square).
        on = (pixels.reshape(-1) > ITEM_THRESHOLD).nonzero().squeeze(1)
        item, row, col = on // (s * s), on // s % s, on % s
        self.own[scenes * self.max_items + slot] = torch.bincount(item, minlength=len(scenes))
        at = ((scenes * self.size + top) * self.size + left)[item] + row * self.size + col
        # Row offset from the item's centre, over the canvas size: the tilt of the module docstring.
        z = depth[item] + slope[item] * ((row.float() - (s - 1) / 2) / self.size)
        # `not (current <= z)` also holds where current is NaN (empty), so empty pixels always take the item.
        take = (~(self.depth[at] <= z)).nonzero().squeeze(1)
        on, item, at = on[take], item[take], at[take]
        self._recount(scenes, item, at, slot)
        self.image[at] = pixels.reshape(-1)[on]
        self.depth[at] = z[take]
        self.segment[at] = segment[item]
        self.owner[at] = slot

    def _recount(self, scenes: torch.Tensor, item: torch.Tensor, at: torch.Tensor, slot: int) -> None:
        """Credit `slot` with the pixels at `at` and debit whoever showed them before."""
        m = self.max_items
        self.shown.index_add_(0, scenes * m + slot, torch.bincount(item, minlength=len(scenes)))
        before = self.owner[at].long()
        lost = before >= 0
        key = at[lost] // (self.size * self.size) * m + before[lost]
        self.shown.index_add_(0, key, torch.full_like(key, -1))

    def visible(self, active: torch.Tensor) -> torch.Tensor:
        """(n, max_items) bool: items showing enough of themselves to count (module docstring)."""
        need = torch.minimum(torch.full_like(self.own, MIN_VISIBLE), (self.own + 1) // 2).clamp(min=1)
        return active & (self.shown >= need).view(self.n, self.max_items)


def _paint(canvas: _Canvas, draws: dict[str, torch.Tensor], tables: list[torch.Tensor],
           segment_of: torch.Tensor) -> None:
    # The z-test makes the result independent of this order (bar exact ties, which the earlier
    # slot keeps); slots then sizes keeps each paste to distinct scenes, so no two writes in one
    # paste hit the same pixel.
    for j in range(canvas.max_items):
        for i, table in enumerate(tables):
            scenes = (draws["active"][:, j] & (draws["scale"][:, j] == i)).nonzero().flatten()
            if scenes.numel() == 0:
                continue
            which = draws["which"][scenes, j]
            canvas.paste(scenes, draws["top"][scenes, j], draws["left"][scenes, j], table[which],
                         draws["depth"][scenes, j], draws["slope"][scenes, j], segment_of[which], j)


def _presence(visible: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    # Hidden items write to a spare column that is dropped, so duplicates never race 1 against 0.
    column = torch.where(visible, classes, torch.full_like(classes, NUM_CLASSES))
    out = torch.zeros(visible.shape[0], NUM_CLASSES + 1)
    out.scatter_(1, column, 1.0)
    return out[:, :NUM_CLASSES]


def make_scenes(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int, size: int = SIZE,
                max_items: int = 4) -> dict[str, torch.Tensor]:
    """images: uint8 (N, 28, 28) real Fashion-MNIST items, labels: int64 (N,) in 0..9.
    Returns, for n scenes:
      "images":   uint8   (n, 1, size, size)  the canvas (background 0)
      "segment":  uint8   (n, size, size)     0 background, c+1 where item class c is the visible one
      "depth":    float32 (n, size, size)     depth of the visible item, NaN on background (invalid)
      "presence": float32 (n, 10)             1.0 where at least one visible item has that class
      "count":    float32 (n,)                number of visible items
    Raises UsageError on bad arguments. Conventions: the module docstring.
    """
    images = _check(images, labels, n, seed, size, max_items)
    labels = labels.cpu().long()
    draws = _draw(n, images.shape[0], size, max_items, torch.Generator().manual_seed(seed))
    tables = _resized(images, draws)
    segment_of = (labels + 1).to(torch.uint8)
    out = {"images": torch.zeros(n, 1, size, size, dtype=torch.uint8),
           "segment": torch.full((n, size, size), BACKGROUND, dtype=torch.uint8),
           # NaN is "nothing painted yet" as well as the final invalid-depth value: no second pass.
           "depth": torch.full((n, size, size), math.nan, dtype=torch.float32)}
    visible = torch.zeros(n, max_items, dtype=torch.bool)
    for start in range(0, n, BLOCK):
        block = slice(start, start + BLOCK)
        canvas = _Canvas(out["images"][block], out["segment"][block], out["depth"][block], size, max_items)
        _paint(canvas, {k: v[block] for k, v in draws.items()}, tables, segment_of)
        visible[block] = canvas.visible(draws["active"][block])
    out["presence"] = _presence(visible, labels[draws["which"]])
    out["count"] = visible.sum(1).float()
    return out


# ---------------------------------------------------------------- figure


def _segment_colours():
    from matplotlib.colors import ListedColormap
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"].colors
    return ListedColormap(["black", *tab10[:NUM_CLASSES]])


def _title(scenes: dict[str, torch.Tensor], i: int) -> str:
    names = [CLASS_NAMES[c] for c in scenes["presence"][i].nonzero().flatten().tolist()]
    count = int(scenes["count"][i].item())
    return f"{count} item{'s' if count != 1 else ''}\n" + "\n".join(names)


def figure(scenes: dict[str, torch.Tensor], path, k: int = 4) -> Path:
    """A k-column picture: row 1 the scene images, row 2 the segment maps (a categorical colormap,
    background black), row 3 the depth maps (invalid background shown blank/white); titles give the
    count and the present class names. Saved as PNG with matplotlib (Agg backend), returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    import matplotlib

    if not _is_int(k) or k < 1:
        raise UsageError(f"k (columns) must be an integer >= 1, got {k!r}")
    k = min(k, scenes["images"].shape[0])
    path = Path(path)
    # A bare Figure on its own Agg canvas: no pyplot state, no display, nothing left open.
    fig = Figure(figsize=(1.9 * k + 1.6, 6.4))
    FigureCanvasAgg(fig)
    # A last, narrower column keeps the class key and the depth scale from squeezing one row's panels.
    grid = fig.add_gridspec(3, k + 1, width_ratios=[1] * k + [0.75])
    axes = [[fig.add_subplot(grid[r, c]) for c in range(k)] for r in range(3)]
    # Near = bright, as in most depth renderings; NaN (background) left white.
    depth_cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="white")
    seg_cmap = _segment_colours()
    for i in range(k):
        axes[0][i].imshow(scenes["images"][i, 0].numpy(), cmap="gray", vmin=0, vmax=255)
        axes[0][i].set_title(_title(scenes, i), fontsize=8, loc="left")
        axes[1][i].imshow(scenes["segment"][i].numpy(), cmap=seg_cmap, vmin=-0.5, vmax=NUM_CLASSES + 0.5,
                          interpolation="nearest")
        shown = axes[2][i].imshow(scenes["depth"][i].numpy(), cmap=depth_cmap, vmin=NEAR, vmax=FAR,
                                  interpolation="nearest")
    for row, name in zip(axes, ("image", "segment", "depth")):
        row[0].set_ylabel(name)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    key = fig.add_subplot(grid[0:2, k])
    key.axis("off")
    key.legend([Patch(color=seg_cmap(c + 1)) for c in range(NUM_CLASSES)], CLASS_NAMES, loc="center left",
               fontsize=7, frameon=False, title="segment", title_fontsize=8)
    scale = fig.add_subplot(grid[2, k])
    scale.axis("off")
    bar = fig.colorbar(shown, ax=scale, fraction=0.25, location="left")
    bar.set_label('depth ("m"), near = light', fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as e:  # a full disk, a read-only folder
        raise CsnetError(f"cannot write {path}: {e.strerror or e}") from e
    return path


# ---------------------------------------------------------------- the data set: --dataset fashion-scenes

TRAIN_SCENES, VAL_SCENES, TEST_SCENES = 20_000, 2_000, 5_000
VAL_IMAGES = 5_000  # training images held out, seeded, to make the validation scenes from


def load_scenes(cfg, spec, tasks):
    """``--dataset fashion-scenes``: scenes made on the fly (about a second) from the real Fashion-MNIST
    files. Training scenes use only training images outside a seeded hold-out of 5,000, validation
    scenes only that hold-out, test scenes only the test images. --train-size, --val-size and
    --test-size count scenes (20,000, 2,000 and 5,000 by default); --split-seed seeds the hold-out and
    every scene, so runs with different training seeds see the same scenes."""
    from csnet.idx import FASHION, locate, read_idx
    from csnet.splits import Data, Split, starve

    files = locate(FASHION, Path(cfg.data_root) if cfg.data_root else None)
    raw = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        if raw[f"{part}_images"].dim() != 3 or int(raw[f"{part}_labels"].max()) >= NUM_CLASSES:
            raise CsnetError(f"{files[f'{part}_images']}: not Fashion-MNIST images (N, 28, 28) with labels 0..9")
    n_train = raw["train_images"].shape[0]
    if n_train <= 1:
        raise CsnetError(f"{files['train_images']}: {n_train} training image(s); scenes need at least two")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.split_seed))
    held = order[:min(VAL_IMAGES, n_train // 2)]
    rest = order[len(held):]
    seed = cfg.split_seed % (MAX_SEED - 2)

    def scenes(images, labels, n, k):
        made = make_scenes(images, labels, n, seed + k)
        targets = {"segment": made["segment"], "depth": made["depth"], "presence": made["presence"],
                   "count": made["count"].unsqueeze(1)}
        return Split(made["images"], {t: targets[t] for t in tasks})

    train = scenes(raw["train_images"][rest], raw["train_labels"][rest], cfg.train_size or TRAIN_SCENES, 0)
    val = scenes(raw["train_images"][held], raw["train_labels"][held], cfg.val_size or VAL_SCENES, 1)
    test = scenes(raw["test_images"], raw["test_labels"], cfg.test_size or TEST_SCENES, 2)
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    pixels = train.images.float()
    return Data(train=train, val=val, test=test, mean=float(pixels.mean()), std=float(pixels.std()), files=files)


def _spec():
    from csnet.idx import FASHION
    from csnet.splits import DatasetSpec
    from csnet.tasks import TaskSpec

    tasks = {"segment": TaskSpec("segmentation", NUM_CLASSES + 1), "depth": TaskSpec("depth", 1),
             "presence": TaskSpec("multilabel", NUM_CLASSES), "count": TaskSpec("regression", 1)}
    return DatasetSpec("fashion-scenes", (FASHION,), tasks, tuple(tasks), (1, SIZE, SIZE), loader=load_scenes,
                       backbone="fcn")


SPEC = _spec()
