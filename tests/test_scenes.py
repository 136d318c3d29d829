"""Scenes for dense multi-task learning (csnet.scenes): shapes, determinism, occlusion, labels."""

from __future__ import annotations

import pytest
import torch

from csnet import scenes
from csnet.data import DATASETS, locate, read_idx
from csnet.errors import CsnetError, UsageError
from csnet.scenes import BACKGROUND, NUM_CLASSES, make_scenes


def _boxes(n_images: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Filled rectangles of several sizes and intensities, some with a dark hole that is not item,
    and two small blocks (under 40 pixels once shrunk, so the half-the-item visibility rule applies)."""
    images = torch.zeros(n_images, 28, 28, dtype=torch.uint8)
    for i in range(n_images):
        if i >= 10:
            images[i, 9:16, 3 * i - 24:3 * i - 17] = 255
            continue
        pad = i % 5
        images[i, pad:28 - pad, 2 * (i % 3):28 - (i % 4)] = 60 + 15 * i
        if i % 4 == 1:
            images[i, 10:18, 10:18] = 5  # below the item threshold: a hole showing what is behind
    return images, torch.arange(n_images) % NUM_CLASSES


@pytest.fixture(scope="module")
def fashion() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        files = locate(DATASETS["fashion"])
    except CsnetError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return read_idx(files["test_images"])[:500], read_idx(files["test_labels"])[:500]


def _reference(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int, size: int, max_items: int):
    """The scenes painted the slow, obvious way from the same draws: per scene, every item's depth
    over the whole canvas (inf off its silhouette), the nearest wins each pixel."""
    draws = scenes._draw(n, len(images), size, max_items, torch.Generator().manual_seed(seed))
    image = torch.zeros(n, size, size, dtype=torch.uint8)
    segment = torch.zeros(n, size, size, dtype=torch.uint8)
    depth = torch.full((n, size, size), float("nan"))
    count = torch.zeros(n)
    presence = torch.zeros(n, NUM_CLASSES)
    for i in range(n):
        zs, pictures, owns = [], [], []
        for j in range(max_items):
            if not draws["active"][i, j]:
                continue
            s = scenes.SCALES[draws["scale"][i, j]]
            top, left = draws["top"][i, j].item(), draws["left"][i, j].item()
            item = scenes._resize(images[draws["which"][i, j]][None], s)[0]
            tilt = draws["slope"][i, j] * ((torch.arange(s).float() - (s - 1) / 2) / size)
            z = torch.full((size, size), float("inf"))
            picture = torch.zeros(size, size, dtype=torch.uint8)
            z[top:top + s, left:left + s] = torch.where(item > scenes.ITEM_THRESHOLD,
                                                        draws["depth"][i, j] + tilt[:, None], float("inf"))
            picture[top:top + s, left:left + s] = item
            zs.append(z)
            pictures.append(picture)
            owns.append(int((item > scenes.ITEM_THRESHOLD).sum()))
        nearest, who = torch.stack(zs).min(0)
        shown = nearest.isfinite()
        active = draws["active"][i].nonzero().flatten()
        image[i][shown] = torch.stack(pictures).gather(0, who[None])[0][shown]
        segment[i][shown] = (labels[draws["which"][i, active]][who] + 1).to(torch.uint8)[shown]
        depth[i][shown] = nearest[shown]
        for slot, own in enumerate(owns):
            if int((shown & (who == slot)).sum()) >= max(1, min(scenes.MIN_VISIBLE, (own + 1) // 2)):
                count[i] += 1
                presence[i, labels[draws["which"][i, active[slot]]]] = 1.0
    return {"images": image[:, None], "segment": segment, "depth": depth, "presence": presence, "count": count}


def _check_consistent(out: dict[str, torch.Tensor], max_items: int) -> None:
    """Properties every output must have, whatever the items."""
    background = out["segment"] == BACKGROUND
    assert torch.equal(background, out["depth"].isnan())
    assert torch.equal(background, out["images"][:, 0] == 0)
    assert ((out["count"] >= 1) & (out["count"] <= max_items)).all()
    # Each present class has a visible item of its own, so at least that many items count.
    assert (out["count"] >= out["presence"].sum(1)).all()
    for seg, present in zip(out["segment"], out["presence"]):
        shown = set(seg.unique().tolist()) - {BACKGROUND}
        assert {c + 1 for c in present.nonzero().flatten().tolist()} <= shown
    d = out["depth"][~out["depth"].isnan()]
    assert d.min() >= scenes.NEAR - scenes.MAX_SLOPE / 2 and d.max() <= scenes.FAR + scenes.MAX_SLOPE / 2


def test_shapes_and_dtypes_on_real_items(fashion):
    images, labels = fashion
    out = make_scenes(images, labels, 16, seed=1)
    expect = {"images": (torch.uint8, (16, 1, 64, 64)), "segment": (torch.uint8, (16, 64, 64)),
              "depth": (torch.float32, (16, 64, 64)), "presence": (torch.float32, (16, 10)),
              "count": (torch.float32, (16,))}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == expect
    _check_consistent(out, 4)
    assert out["segment"].max() <= NUM_CLASSES


def test_real_items_match_the_reference_painter(fashion):
    images, labels = fashion
    out = make_scenes(images, labels, 24, seed=3)
    ref = _reference(images, labels.long(), 24, seed=3, size=64, max_items=4)
    for key in ("images", "segment", "presence", "count"):
        assert torch.equal(out[key], ref[key]), key
    torch.testing.assert_close(out["depth"], ref["depth"], equal_nan=True)


@pytest.mark.parametrize("size,max_items", [(28, 3), (40, 6), (64, 1)])
def test_occlusion_and_labels_match_the_reference_painter(size, max_items):
    images, labels = _boxes()
    out = make_scenes(images, labels, 40, seed=7, size=size, max_items=max_items)
    ref = _reference(images, labels, 40, seed=7, size=size, max_items=max_items)
    for key in ("images", "segment", "presence", "count"):
        assert torch.equal(out[key], ref[key]), key
    torch.testing.assert_close(out["depth"], ref["depth"], equal_nan=True)
    _check_consistent(out, max_items)


def test_a_near_full_canvas_item_hides_everything_behind_it():
    """Black-box occlusion: on a 28 px canvas a near (28 px) solid item covers every pixel, and every
    smaller item is farther, so none may show. Painting near to far would let them show."""
    images = torch.full((4, 28, 28), 200, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    out = make_scenes(images, labels, 300, seed=0, size=28, max_items=3)
    # Depth below 3.26 can only come from a near item centred below 3.5 (tilt moves it by at most
    # 0.24), which is nearer than 3.74 everywhere; 21 and 14 px items are never nearer than 3.82.
    near = out["depth"].flatten(1).min(1).values < 3.26
    sizes = (out["segment"] != BACKGROUND).flatten(1).sum(1)
    assert near.sum() >= 20 and (~near & (sizes < 28 * 28)).sum() >= 20  # both kinds occur
    assert (out["depth"][near].flatten(1).max(1).values < 3.82).all()
    assert (sizes[near] == 28 * 28).all()


def test_same_seed_same_scenes_other_seed_other_scenes():
    images, labels = _boxes()
    state = torch.get_rng_state()
    a = make_scenes(images, labels, 10, seed=5, size=48)
    b = make_scenes(images, labels, 10, seed=5, size=48)
    c = make_scenes(images, labels, 10, seed=6, size=48)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    for key in a:
        assert torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1)), key
    assert not torch.equal(a["segment"], c["segment"])


def test_channel_axis_and_label_dtypes_are_accepted():
    images, labels = _boxes()
    a = make_scenes(images, labels, 6, seed=2)
    b = make_scenes(images[:, None], labels.to(torch.uint8), 6, seed=2)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["presence"], b["presence"])


def test_count_is_one_for_single_items_and_drops_when_items_hide_each_other():
    """One item: count is 1 in every scene. With up to 6 items on a 28 px canvas many get hidden, so
    counts average below the 3.5 items a scene holds, but never fall below one."""
    images, labels = _boxes()
    one = make_scenes(images, labels, 30, seed=4, max_items=1)
    assert (one["count"] == 1).all() and torch.equal(one["presence"].sum(1), torch.ones(30))
    many = make_scenes(images, labels, 200, seed=4, size=28, max_items=6)
    assert many["count"].min() >= 1 and many["count"].float().mean() < 3.5  # 1..6 items, mean 3.5


@pytest.mark.parametrize("change,match", [
    (lambda im, lb: (im.float(), lb), "uint8"),
    (lambda im, lb: (im[:, :, :20], lb), "shape"),
    (lambda im, lb: (im[:0], lb[:0]), "N >= 1"),
    (lambda im, lb: (im, lb[:-1]), "labels must have shape"),
    (lambda im, lb: (im, lb + 5), "0..9"),
    (lambda im, lb: (im, lb - 1), "0..9"),
    (lambda im, lb: (im, lb.float()), "integer"),
])
def test_bad_inputs_raise_usage_errors(change, match):
    images, labels = change(*_boxes())
    with pytest.raises(UsageError, match=match):
        make_scenes(images, labels, 3, seed=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "n "), ({"n": 2.0}, "n "), ({"seed": -1}, "seed"), ({"size": 27}, "size"),
    ({"max_items": 0}, "max_items"), ({"max_items": True}, "max_items"),
])
def test_bad_counts_raise_usage_errors(kwargs, match):
    images, labels = _boxes()
    args = {"n": 3, "seed": 0} | kwargs
    with pytest.raises(UsageError, match=match):
        make_scenes(images, labels, **args)


def test_figure_writes_a_png(tmp_path):
    images, labels = _boxes()
    out = make_scenes(images, labels, 3, seed=0)
    path = scenes.figure(out, tmp_path / "sub" / "scenes.png", k=4)  # k larger than n is clipped
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError):
        scenes.figure(out, tmp_path / "x.png", k=0)
