"""Rendered shape scenes with captions and ground truth, a pixel scorer for them, and image-folder I/O.

A scene is one to three identical objects (same colour, shape, size) on black, placed so the centroid of all object
pixels lies in the captioned region; an image generated from the caption is scored from its pixels alone
(:func:`score_image`), a tiny GenEval-like check. ``Scene.image`` is uint8 (H, W, 3) numpy (as PNG/PIL); the scorer
also takes float (3, H, W) in [0, 1] (what models output); :func:`to_tensor` gives the float32 (N, 3, H, W) batch.
The reader takes the "imagefolder" layout: images next to a ``metadata.jsonl`` with ``file_name`` and ``text``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from ...utils import atomic_write

PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40),
           "white": (235, 235, 235), "purple": (150, 60, 200)}  # RGB, far apart: nearest-colour survives blur
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)
_COUNT_WORD = {1: "a", 2: "two", 3: "three"}
_POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}
_SIDE = {"small": 0.2, "large": 0.32}  # object side as a fraction of the image side (6 and 10 px at 32)
_CENTER_RADIUS = 0.25  # centroid within this (fraction of half the side) of the middle on both axes: "center"
_MARGIN = 0.08  # the generator keeps centroids this far inside their region, so pixelation cannot flip it


@dataclass
class Scene:
    """A scene: ``image`` uint8 (H, W, 3), ``caption``, ``attributes`` (colour, shape, size, position, count)."""

    image: np.ndarray
    caption: str
    attributes: dict = field(default_factory=dict)


def caption_of(attributes: dict) -> str:
    """The caption for a set of attributes, e.g. "two large blue squares at the top"."""
    a, plural = attributes, "s" if attributes["count"] > 1 else ""
    return f"{_COUNT_WORD[a['count']]} {a['size']} {a['colour']} {a['shape']}{plural} {_POS_PHRASE[a['position']]}"


def _side_px(size_name: str, size: int) -> int:
    return max(3, round(_SIDE[size_name] * size))


def _position_of(dx: float, dy: float, margin: float = 0.0) -> str | None:
    """Region of a centroid given as offsets from the middle in units of half the side (x right, y down).
    With ``margin`` > 0, None when the point is within ``margin`` of a region boundary."""
    if max(abs(dx), abs(dy)) < _CENTER_RADIUS - margin:
        return "center"
    if max(abs(dx), abs(dy)) < _CENTER_RADIUS + margin or abs(abs(dx) - abs(dy)) < margin:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _place(rng: np.random.Generator, attrs: dict, size: int, tries: int = 2000):
    """Top-left corners of ``count`` non-touching boxes whose joint centroid lies in the region, or None.
    Rejection sampling, vectorised over ``tries`` candidate layouts; the first valid one wins."""
    d, k = _side_px(attrs["size"], size), attrs["count"]
    xy = rng.integers(1, size - d, size=(tries, k, 2))  # 1 px border
    ok = np.ones(tries, dtype=bool)
    for i in range(k):
        for j in range(i):  # a >= 2 px gap keeps objects separate components even after some blur
            gap = np.abs(xy[:, i] - xy[:, j]) >= d + 2
            ok &= gap[:, 0] | gap[:, 1]
    # Centroid of the drawn pixels; a triangle (apex up) has its mass (d - 1) / 6 below its box centre.
    c = xy.mean(1) + (d - 1) / 2
    c[:, 1] += (d - 1) / 6 if attrs["shape"] == "triangle" else 0.0
    rel = (c - (size - 1) / 2) / (size / 2)
    for t in np.flatnonzero(ok):
        if _position_of(rel[t, 0], rel[t, 1], _MARGIN) == attrs["position"]:
            return xy[t], d
    return None


def _render(attrs: dict, xy: np.ndarray, d: int, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw, colour = ImageDraw.Draw(img), PALETTE[attrs["colour"]]
    for x, y in xy.tolist():
        box = [x, y, x + d - 1, y + d - 1]
        if attrs["shape"] == "triangle":  # apex up
            draw.polygon([(x + (d - 1) / 2, y), (x, y + d - 1), (x + d - 1, y + d - 1)], fill=colour)
        else:
            (draw.ellipse if attrs["shape"] == "circle" else draw.rectangle)(box, fill=colour)
    return np.asarray(img, dtype=np.uint8).copy()


def generate_scenes(n: int, *, size: int = 32, seed: int = 0) -> list[Scene]:
    """``n`` scenes, deterministic in ``seed``.

    Args:
        n: number of scenes.
        size: image side in pixels (default 32; at least 24 so three large objects fit).
        seed: RNG seed; the same (n, size, seed) gives identical scenes, and a prefix of a longer run.

    Attributes are drawn uniformly; a combination that cannot be placed at this size (e.g. three large objects
    in the center at 32 px) is redrawn, so those are rarer than uniform.
    """
    if size < 24:
        raise ValueError(f"size must be at least 24 pixels, got {size}")
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        attrs = {"colour": str(rng.choice(list(PALETTE))), "shape": str(rng.choice(SHAPES)),
                 "size": str(rng.choice(SIZES)), "position": str(rng.choice(POSITIONS)),
                 "count": int(rng.choice(COUNTS))}
        if (placed := _place(rng, attrs, size)) is not None:
            scenes.append(Scene(_render(attrs, *placed, size), caption_of(attrs), attrs))
    return scenes


def to_tensor(scenes) -> torch.Tensor:
    """Stack scenes (or uint8 (H, W, 3) arrays) into a float32 (N, 3, H, W) tensor in [0, 1]."""
    arr = np.stack([s.image if isinstance(s, Scene) else s for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def _as_uint8_hwc(image) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:  # float images are taken to be in [0, 1]
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


def _shape_of(mask: np.ndarray) -> str:
    """Shape of one component from its bounding-box crop: squares fill their box (circle ~0.79, triangle
    ~0.5); a triangle with its apex up has most of its mass in the bottom rows, a circle is symmetric."""
    h = mask.shape[0]
    if mask.mean() >= 0.88:
        return "square"
    k = max(1, h // 3)
    top, bottom = mask[:k].sum(), mask[h - k:].sum()
    return "triangle" if bottom > 1.6 * max(top, 1) else "circle"


def score_image(image, attributes: dict) -> dict:
    """Score an image against attributes, from its pixels alone (deterministic).

    Pixels are classified to the nearest palette colour (background included); the components (4-connected)
    of the requested colour's mask larger than a third of a small object are the detected objects, so
    speckle noise does not count.

    Returns booleans ``colour`` (an object of the requested colour exists), ``count`` (number of objects),
    ``position`` (centroid of the objects' pixels in the requested region), ``size`` (median box side nearer
    the requested size), ``shape`` (majority of objects' shapes), and ``all`` (every one of them). Like
    GenEval, every attribute is judged on the objects of the requested colour, so all are False without one.
    """
    a = _as_uint8_hwc(image).astype(np.int32)
    h, w = a.shape[:2]
    pal = np.array([BACKGROUND, *PALETTE.values()], dtype=np.int32)
    nearest = ((a[:, :, None, :] - pal[None, None]) ** 2).sum(-1).argmin(-1)
    mask = nearest == 1 + list(PALETTE).index(attributes["colour"])  # index 0 is the background
    labels, n = ndimage.label(mask)
    small, large = _side_px("small", min(h, w)), _side_px("large", min(h, w))
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
    keep = [i + 1 for i in range(n) if areas[i] >= small * small / 3]
    out = dict.fromkeys(("colour", "count", "position", "size", "shape"), False)
    if keep:
        ys, xs = np.nonzero(np.isin(labels, keep))
        out["colour"], out["count"] = True, len(keep) == attributes["count"]
        out["position"] = _position_of((xs.mean() - (w - 1) / 2) / (w / 2),
                                       (ys.mean() - (h - 1) / 2) / (h / 2)) == attributes["position"]
        crops = [labels[box] == i for i, box in enumerate(ndimage.find_objects(labels), 1) if i in keep]
        side = float(np.median([max(c.shape) for c in crops]))
        out["size"] = ("large" if side >= (small + large) / 2 else "small") == attributes["size"]
        shapes = [_shape_of(c) for c in crops]  # majority vote; ties go to the first in SHAPES
        out["shape"] = max(SHAPES, key=shapes.count) == attributes["shape"]
    out["all"] = all(out.values())
    return out


def score_batch(images, attributes: list[dict]) -> dict:
    """Mean of :func:`score_image` over a batch: accuracies in [0, 1] per key."""
    rows = [score_image(im, at) for im, at in zip(images, attributes, strict=True)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def chance_scores(n: int = 200, *, size: int = 32, seed: int = 0) -> dict:
    """What chance scores (means over ``n`` images, for "against chance" comparisons): ``mismatched``, each scene
    against another scene's attributes (a random caption's image); ``noise``, uniform random pixels; ``blank``,
    an all-background image."""
    scenes = generate_scenes(n, size=size, seed=seed)
    attrs = [s.attributes for s in scenes]
    shifted = attrs[1:] + attrs[:1]  # a derangement: no scene is scored against its own attributes
    noise = np.random.default_rng(seed + 1).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return {"mismatched": score_batch([s.image for s in scenes], shifted), "noise": score_batch(noise, attrs),
            "blank": score_batch(np.zeros_like(noise), attrs)}


def save_image_folder(scenes, folder) -> Path:
    """Write scenes as ``000000.png`` ... plus ``metadata.jsonl`` (file_name, text, attributes), each file
    atomically and the metadata last, so a folder with metadata is always complete. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(scenes):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG")
        atomic_write(folder / f"{i:06d}.png", buf.getvalue())
        rows.append({"file_name": f"{i:06d}.png", "text": s.caption, **s.attributes})
    atomic_write(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return folder


@dataclass
class ImageFolderData:
    """What :func:`load_image_folder` read: ``images`` float32 (N, 3, size, size) in [0, 1], ``captions``, the
    metadata ``rows`` kept, and the ``skipped`` problems (one message per skipped row, naming the file)."""

    images: torch.Tensor
    captions: list[str]
    rows: list[dict]
    skipped: list[str]

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _read_row(folder: Path, row, size: int) -> np.ndarray:
    """The row's image as uint8 (size, size, 3); ValueError saying what is wrong with the row."""
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise ValueError("empty or missing caption ('text')")
    path = folder / row["file_name"]
    if not path.is_file():
        raise ValueError("image file is missing")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated or corrupt file fails here, not later
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image file is unreadable ({type(e).__name__}: {e})") from None
    w, h = im.size
    s = min(w, h)  # centre crop to a square, then resize: keeps the aspect ratio of objects
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.Resampling.BICUBIC) if im.size != (size, size) else im
    return np.asarray(im, dtype=np.uint8)


def load_image_folder(folder, size: int = 32, *, skip_bad: bool = False) -> ImageFolderData:
    """Read an image folder with ``metadata.jsonl`` rows {"file_name", "text", ...} (PNG, JPEG or anything PIL
    opens), centre-cropped to square and resized to ``size`` x ``size`` pixels (default 32).

    A bad row (unparsable JSON, no file_name, empty caption, missing or unreadable image) raises ValueError
    naming the line and file, or with ``skip_bad=True`` is skipped and its message kept in ``skipped``. A
    missing or undecodable ``metadata.jsonl`` is always an error.
    """
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {meta} (rows with 'file_name' and 'text' expected): {e}") from None
    images, captions, rows, skipped = [], [], [], []
    for lineno, line in ((i, text) for i, text in enumerate(lines, start=1) if text.strip()):
        name = "?"
        try:
            row = json.loads(line)  # a JSONDecodeError is a ValueError: reported like any bad row
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
                raise ValueError("row has no 'file_name' string")
            name = row["file_name"]
            images.append(_read_row(folder, row, size))
        except ValueError as e:
            msg = f"{meta}:{lineno}: file {name!r}: {e}"
            if not skip_bad:
                raise ValueError(msg) from None
            skipped.append(msg)
            continue
        captions.append(row["text"])
        rows.append(row)
    empty = torch.zeros(0, 3, size, size, dtype=torch.float32)
    return ImageFolderData(to_tensor(images) if images else empty, captions, rows, skipped)
