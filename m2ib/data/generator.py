"""Seeded generator of grounded image-caption pairs: coloured shapes, one of them named by the caption.

Why: real CLIP weights and real grounded data cannot be downloaded here, so the default benchmark is
generated. Every pair has an image ground truth (the target's tight box) and a text ground truth
(the caption words naming the target), so both image and text attributions can be scored.

Design choices (see /work/shared/DESIGN.md, "Lessons from training a tiny CLIP on generated shapes"):
- The target's attributes are drawn first and INDEPENDENTLY of the distractors; distractors are drawn
  uniformly and only rejected when identical to the target (so the caption stays unambiguous). The
  image alone therefore does not reveal which object is the target ("odd one out" cannot work).
- Sometimes the target appears twice (plural caption, two boxes): that exercises the several-boxes-per-
  pair layout of MS-CXR.
- Captions vary wording with filler words and synonyms; the size word is included when a distractor has
  the target's colour and shape (needed to disambiguate) and otherwise with probability 1/2.
- Objects are placed inside the region that survives the model's centre crop, so a box is never cut.
- Each pair is generated from its own RNG seeded by (seed, split, index): a pair does not depend on
  how many pairs were generated before it, so `limit` and parallel generation give identical pairs.
- Drawing is done with skimage.draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
from skimage import draw

from m2ib.core.errors import InputError

GENERATOR_VERSION = 1
IMAGE_SIZE = (96, 80)          # (width, height) of the original images: not square, so the crop matters
MODEL_INPUT = 64               # square side the embedded model sees (resize shortest side + centre crop)
COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 45),
    "purple": (155, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
SIZES = {"small": (13, 16), "large": (22, 27)}     # extent range in original pixels
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SINGULAR_TEMPLATES = (
    "{a} {d}",
    "a photo of {a} {d}",
    "there is {a} {d} in the picture",
    "look at the {d}",
    "the {d} among other shapes",
    "an image with {a} {d} somewhere",
    "can you spot the {d}",
    "this shows {a} {d} and some other objects",
    "{d}",
    "find the {d} in this image",
)
PLURAL_TEMPLATES = (
    "two {d}",
    "a photo of two {d}",
    "there are two {d} in the picture",
    "look at the two {d}",
    "a pair of {d} among other shapes",
    "can you spot both {d}",
)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its attributes and its tight box (x, y, w, h) in original pixels."""

    colour: str
    shape: str
    size: str
    box: tuple[int, int, int, int]

    def attributes(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.size)


@dataclass
class GeneratedPair:
    """A generated image (H, W, 3) uint8 with its caption and both ground truths."""

    id: str
    image: np.ndarray
    caption: str
    target_words: list[str]
    boxes: np.ndarray                          # (K, 4) x, y, w, h of every target instance
    target: tuple[str, str, str]               # (colour, shape, size)
    objects: list[ShapeObject] = field(default_factory=list)   # targets first, then distractors

    @property
    def category(self) -> str:
        return self.target[1]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_CODES:
        raise InputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index), GENERATOR_VERSION])


def _shape_pixels(shape: str, x: int, y: int, s: int, hw: tuple[int, int]):
    """Row/column indices of a filled shape in the s x s square at (x, y), drawn by skimage.draw."""
    if shape == "circle":
        r = s / 2.0
        return draw.disk((y + r - 0.5, x + r - 0.5), r, shape=hw)
    if shape == "square":
        inset = max(1, round(s * 0.08))
        rr, cc = draw.rectangle((y + inset, x + inset), (y + s - 1 - inset, x + s - 1 - inset), shape=hw)
        return rr.ravel(), cc.ravel()
    if shape == "triangle":
        rows = np.array([y, y + s - 1, y + s - 1], dtype=float)
        cols = np.array([x + (s - 1) / 2.0, x + s - 1, x], dtype=float)
        return draw.polygon(rows, cols, shape=hw)
    if shape == "diamond":
        c = (s - 1) / 2.0
        rows = np.array([y, y + c, y + s - 1, y + c], dtype=float)
        cols = np.array([x + c, x + s - 1, x + c, x], dtype=float)
        return draw.polygon(rows, cols, shape=hw)
    if shape == "cross":
        t = max(3, round(s * 0.34))
        a = (s - t) // 2
        r1, c1 = draw.rectangle((y + a, x), (y + a + t - 1, x + s - 1), shape=hw)
        r2, c2 = draw.rectangle((y, x + a), (y + s - 1, x + a + t - 1), shape=hw)
        return np.concatenate([r1.ravel(), r2.ravel()]), np.concatenate([c1.ravel(), c2.ravel()])
    raise InputError(f"unknown shape {shape!r}")


def _safe_region(image_size=IMAGE_SIZE, model_input=MODEL_INPUT, margin=2):
    """(x0, y0, x1, y1) of the original-image region that survives resize(shortest)+centre crop."""
    w, h = image_size
    scale = model_input / min(w, h)
    keep_w, keep_h = model_input / scale, model_input / scale
    x0 = int(np.ceil((w - keep_w) / 2.0)) + margin
    y0 = int(np.ceil((h - keep_h) / 2.0)) + margin
    return x0, y0, w - x0, h - y0


def _place(rng, extent: int, taken: list, region, gap=2, tries=200):
    x0, y0, x1, y1 = region
    taken = [t for t in taken if t is not None]
    for _ in range(tries):
        x = int(rng.integers(x0, x1 - extent + 1))
        y = int(rng.integers(y0, y1 - extent + 1))
        if all(x + extent + gap <= bx or bx + bw + gap <= x or y + extent + gap <= by or by + bh + gap <= y
               for bx, by, bw, bh in taken):
            return x, y
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generate_pair(seed: int, split: str, index: int) -> GeneratedPair:
    """The pair number `index` of `split` for data seed `seed` (pure function of its arguments)."""
    rng = _rng(seed, split, index)
    w, h = IMAGE_SIZE
    colours, sizes = list(COLOURS), list(SIZES)
    target = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
              sizes[rng.integers(len(sizes))])
    n_target = 2 if rng.random() < 0.2 else 1
    n_distractors = int(rng.integers(2, 5))
    distractors = []
    while len(distractors) < n_distractors:
        d = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
             sizes[rng.integers(len(sizes))])
        if d != target:
            distractors.append(d)

    background = int(rng.integers(25, 75))
    image = np.full((h, w, 3), background, dtype=np.int16)
    image += np.round(rng.normal(0.0, 5.0, size=(h, w, 1))).astype(np.int16)
    region = _safe_region()
    specs = [target] * n_target + distractors
    extents = [int(rng.integers(SIZES[sz][0], SIZES[sz][1] + 1)) for _, _, sz in specs]
    for _attempt in range(50):      # lay out targets first; restart if they do not fit together
        taken: list[tuple[int, int, int, int]] = []
        for k, extent in enumerate(extents):
            spot = _place(rng, extent, taken, region)
            if spot is None and k < n_target:
                break
            taken.append((spot[0], spot[1], extent, extent) if spot else None)
        else:
            break
    else:
        raise RuntimeError(f"no room for the target(s) of pair {split}-{index}")
    objects: list[ShapeObject] = []
    for (colour, shape, size), spot in zip(specs, taken):
        if spot is None:
            continue                 # a distractor that did not fit is dropped
        x, y, extent, _ = spot
        rr, cc = _shape_pixels(shape, x, y, extent, (h, w))
        rgb = np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3)
        image[rr, cc] = rgb
        box = (int(cc.min()), int(rr.min()), int(cc.max() - cc.min() + 1), int(rr.max() - rr.min() + 1))
        objects.append(ShapeObject(colour, shape, size, box))

    colour, shape, size = target
    size_needed = any(o.colour == colour and o.shape == shape and o.size != size for o in objects)
    words = []
    if size_needed or rng.random() < 0.5:
        words.append(SIZE_WORDS[size][rng.integers(len(SIZE_WORDS[size]))])
    words += [colour, PLURALS[shape] if n_target == 2 else shape]
    desc = " ".join(words)
    templates = PLURAL_TEMPLATES if n_target == 2 else SINGULAR_TEMPLATES
    caption = templates[rng.integers(len(templates))].format(a=_article(desc), d=desc)
    boxes = np.array([o.box for o in objects[:n_target]], dtype=np.float32)
    return GeneratedPair(id=f"{split}-{index:05d}", image=np.clip(image, 0, 255).astype(np.uint8),
                         caption=caption, target_words=words, boxes=boxes, target=target, objects=objects)


def generate_split(split: str, n: int, seed: int, start: int = 0) -> Iterator[GeneratedPair]:
    """Pairs start .. start+n-1 of a split."""
    if n < 0:
        raise InputError(f"number of pairs must be >= 0, got {n}")
    for i in range(start, start + n):
        yield generate_pair(seed, split, i)


#: plural template -> the singular template of the same wording (an alternative caption names one object)
PLURAL_TO_SINGULAR = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6}
FALLBACK_TEMPLATE = 1


def _attrs(obj: dict) -> tuple[str, str, str]:
    return (str(obj["colour"]), str(obj["shape"]), str(obj["size"]))


def _template_index(caption: str, target_words) -> int:
    """Index into SINGULAR_TEMPLATES of a caption's wording (FALLBACK_TEMPLATE if none fits)."""
    if target_words:
        desc = " ".join(target_words)
        for k, t in enumerate(SINGULAR_TEMPLATES):
            if t.format(a=_article(desc), d=desc) == caption:
                return k
        for k, t in enumerate(PLURAL_TEMPLATES):
            if t.format(d=desc) == caption:
                return PLURAL_TO_SINGULAR[k]
    return FALLBACK_TEMPLATE


def other_object(target, objects: list[dict]) -> Optional[dict]:
    """The first object of the image that is not the target and whose attributes no other object shares
    (so a caption naming it is unambiguous), or None."""
    target = tuple(str(t) for t in target)
    counts: dict = {}
    for o in objects:
        counts[_attrs(o)] = counts.get(_attrs(o), 0) + 1
    return next((o for o in objects if _attrs(o) != target and counts[_attrs(o)] == 1), None)


def alternative_caption(caption: str, target_words, target, objects: list[dict],
                        size_in_caption: bool) -> Optional[dict]:
    """A caption naming another object of the same image, in the true caption's wording (a plural
    template maps to its singular counterpart), with colour and shape, plus the size word when the
    true caption has one or another object of that colour and shape differs in size:
    {caption, target_words, boxes} for Sample.meta['alternative'], or None (no unambiguous object)."""
    obj = other_object(target, objects)
    if obj is None:
        return None
    colour, shape, size = _attrs(obj)
    size_needed = any(_attrs(o)[:2] == (colour, shape) and _attrs(o)[2] != size for o in objects)
    words = ([size] if size_needed or size_in_caption else []) + [colour, shape]
    desc = " ".join(words)
    return {"caption": SINGULAR_TEMPLATES[_template_index(caption, target_words)].format(a=_article(desc), d=desc),
            "target_words": words, "boxes": [list(obj["box"])]}


def pixel_sha256(image: np.ndarray) -> str:
    """Hash of decoded pixels and shape (not file bytes: PNG encoders differ between zlib builds)."""
    import hashlib
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()

