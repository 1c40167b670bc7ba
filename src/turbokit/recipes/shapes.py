"""`shapes`: a deterministic synthetic text-to-image dataset of one or two coloured shapes (issue 4 §1).

"Images of 64×64 or more with one or two objects — shape, colour, size, position — on a coloured
background, with natural-language captions from varied templates. Attribute labels are kept for
evaluation. Some shape–colour pairs are held out of training, for a compositional test. Generated on
the fly or cached, reproducible from a seed."

A scene puts each object inside one cell of a 3×3 grid (its position), so two objects never
overlap and their relation ("to the left of", "above", ...) follows from their cells. Sample `i` of
a split is drawn from `(seed, split, i)` alone: any index is random-access and reproducible.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageDraw

from turbokit.distill.data import SkippedSamples
from turbokit.errors import TurbokitError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (245, 130, 200),
    "brown": (120, 70, 30),
}
"""Object colours, far apart in RGB so an evaluator (or a pixel test) can tell them apart."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (225, 210, 180),
    **{name: COLOURS[name] for name in ("blue", "red", "green", "yellow")},
}
"""Background colours: four neutral ones and four object colours ("a red circle on a blue background").
A scene never puts an object on a background of its own colour, so every object stands out."""
SIZES: dict[str, tuple[float, float]] = {"small": (0.05, 0.07), "medium": (0.09, 0.11), "large": (0.13, 0.15)}
"""Object radius (half its extent) as a fraction of the image side; a grid cell's half-width is 1/6."""
POSITIONS = (
    "top left corner",
    "top",
    "top right corner",
    "left",
    "center",
    "right",
    "bottom left corner",
    "bottom",
    "bottom right corner",
)
"""The 3×3 grid's cells, row by row: position `p` is row `p // 3`, column `p % 3`."""
RELATIONS = ("to the left of", "to the right of", "above", "below")
"""How the first of two objects lies relative to the second."""
HELD_OUT_PAIRS = frozenset(
    {
        ("circle", "green"),
        ("square", "purple"),
        ("triangle", "orange"),
        ("star", "blue"),
        ("hexagon", "red"),
        ("heart", "yellow"),
    }
)
"""(shape, colour) pairs never in the train or test splits, each shape and colour in at most one pair, so
every shape and every colour is still seen in training: the compositional test."""
SPLITS = ("train", "test", "heldout", "evaluator")
"""`train` and `test` (in distribution, another seed stream) exclude `HELD_OUT_PAIRS`; every `heldout`
scene contains at least one of them; `evaluator` draws every pair, for the evaluator network alone (it
judges the held-out row, so it must have seen those pairs; no generator ever trains on it)."""

MARGIN = 0.01
"""Least gap (fraction of the image side) between an object and its cell's border."""
_ALL_PAIRS = tuple((shape, colour) for shape in SHAPES for colour in COLOURS)
_SEEN_PAIRS = tuple(pair for pair in _ALL_PAIRS if pair not in HELD_OUT_PAIRS)
_UNSEEN_PAIRS = tuple(sorted(HELD_OUT_PAIRS))

Holdout = Literal["exclude", "include", "any"]


@dataclass(frozen=True)
class ShapeObject:
    """One shape: its attributes, and where it is drawn (centre and radius as fractions of the image side)."""

    shape: str
    colour: str
    size: str
    position: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; `relation` says where `objects[0]` lies relative to `objects[1]`."""

    objects: tuple[ShapeObject, ...]
    background: str
    relation: str | None = None

    def labels(self) -> dict[str, Any]:
        """Attribute indices into SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS and RELATIONS, for the evaluator."""
        return {
            "background": list(BACKGROUNDS).index(self.background),
            "relation": None if self.relation is None else RELATIONS.index(self.relation),
            "objects": [
                {
                    "shape": SHAPES.index(o.shape),
                    "colour": list(COLOURS).index(o.colour),
                    "size": list(SIZES).index(o.size),
                    "position": POSITIONS.index(o.position),
                }
                for o in self.objects
            ],
        }


# ---------------------------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, holdout: Holdout = "exclude") -> Scene:
    """A random scene of one or two objects in distinct grid cells. `holdout`: "exclude" keeps every
    (shape, colour) pair out of HELD_OUT_PAIRS, "include" makes one object a held-out pair (the other
    any pair), "any" draws from all pairs."""
    count = int(rng.integers(1, 3))
    cells = [int(c) for c in rng.choice(len(POSITIONS), size=count, replace=False)]
    unseen = int(rng.integers(count)) if holdout == "include" else -1
    objects = []
    for k, cell in enumerate(cells):
        pairs = _UNSEEN_PAIRS if k == unseen else _SEEN_PAIRS if holdout == "exclude" else _ALL_PAIRS
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        objects.append(ShapeObject(shape, colour, size, POSITIONS[cell], *draw_placement(rng, size, cell)))
    relation = None
    if count == 2:
        true_relations = relations_between(cells[0], cells[1])
        relation = true_relations[int(rng.integers(len(true_relations)))]
    return Scene(tuple(objects), draw_background(rng, objects), relation)


def draw_placement(rng: np.random.Generator, size: str, cell: int) -> tuple[float, float, float]:
    """A random radius within the `size` class and a centre that keeps the object inside grid `cell`: (x, y, radius)."""
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high))
    slack = 1 / 6 - radius - MARGIN  # how far the centre may move and keep the object inside its cell
    row, col = divmod(cell, 3)
    x = (col + 0.5) / 3 + float(rng.uniform(-slack, slack))
    y = (row + 0.5) / 3 + float(rng.uniform(-slack, slack))
    return x, y, radius


def draw_background(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> str:
    """A random background colour that none of `objects` has."""
    used = {o.colour for o in objects}
    backgrounds = [name for name in BACKGROUNDS if name not in used]
    return backgrounds[int(rng.integers(len(backgrounds)))]


def relations_between(first: int, second: int) -> list[str]:
    """The relations true of the object in cell `first` relative to the one in cell `second`."""
    (row_a, col_a), (row_b, col_b) = divmod(first, 3), divmod(second, 3)
    relations = []
    if col_a != col_b:
        relations.append("to the left of" if col_a < col_b else "to the right of")
    if row_a != row_b:
        relations.append("above" if row_a < row_b else "below")
    return relations


# ---------------------------------------------------------------------------------------------- rendering


def _regular(corners: int, radius: float = 1.0, turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    """A regular polygon's corners on a circle, the first straight up (image y points down)."""
    return [
        (radius * math.cos(turn + 2 * math.pi * k / corners), radius * math.sin(turn + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
    return [corner for pair in zip(outer, inner, strict=True) for corner in pair]


def _heart(points: int = 64) -> list[tuple[float, float]]:
    """The classic parametric heart, x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t, centred and
    scaled into the unit square (its y spans [−17, 5], its x [−16, 16])."""
    outline = []
    for k in range(points):
        t = 2 * math.pi * k / points
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        outline.append((x / 16, -(y + 6) / 16))
    return outline


def _cross(arm: float = 0.33) -> list[tuple[float, float]]:
    """A plus sign whose arms are `2 × arm` wide: the top arm's three corners, turned by 90° four times."""
    turned = [(-arm, -1.0), (arm, -1.0), (arm, -arm)]
    outline = []
    for _ in range(4):
        outline += turned
        turned = [(-y, x) for x, y in turned]
    return outline


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(x, y + 0.25) for x, y in _regular(3)],  # centred on its bounding box, not its circumcentre
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
    "cross": _cross(),
    "hexagon": _regular(6),
    "heart": _heart(),
}
"""Each shape's outline in units of its radius, centred on the origin and inside the unit square."""


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """The scene as a `size`×`size` RGB image: drawn `supersample` times larger and downsampled with
    Lanczos, which anti-aliases the edges. The same scene always gives the same pixels."""
    canvas = size * supersample
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * canvas, o.y * canvas, o.radius * canvas
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx + r * u, cy + r * v) for u, v in _OUTLINES[o.shape]], fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else image


# ---------------------------------------------------------------------------------------------- captions

_PLACES = {
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
ONE_OBJECT_TEMPLATES = (
    "{a}",
    "{a} {pa}",
    "{a} on {bg} background",
    "{a} {pa} on {bg} background",
    "a picture of {a} {pa}",
    "{bg} background with {a} {pa}",
    "an image of {a} on {bg} background",
)
TWO_OBJECT_TEMPLATES = (
    "{a} and {b}",
    "{a} {rel} {b}",
    "{a} {rel} {b} on {bg} background",
    "a picture of {a} {rel} {b}",
    "{a} {pa} and {b} {pb}",
    "{a} {pa} and {b} {pb} on {bg} background",
    "{bg} background with {a} {pa} and {b} {pb}",
)
"""Caption forms: `{a}`, `{b}` an object with its article ("a small red circle", "an orange star"; the size
in half the captions), `{pa}`, `{pb}` its place ("in the top left corner", "at the top"), `{rel}` the
scene's relation, `{bg}` the background with its article. Every form names each object's shape and colour."""


def place(position: str) -> str:
    """A position as a caption says it: "in the top left corner", "at the top", "in the center"."""
    return _PLACES.get(position, f"in the {position}")


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A natural-language caption of `scene` from a random template; it states only what is true of the scene."""
    templates = ONE_OBJECT_TEMPLATES if len(scene.objects) == 1 else TWO_OBJECT_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    nouns = [_with_article(f"{o.size + ' ' if rng.random() < 0.5 else ''}{o.colour} {o.shape}") for o in scene.objects]
    fields = {
        "a": nouns[0],
        "b": nouns[-1],
        "pa": place(scene.objects[0].position),
        "pb": place(scene.objects[-1].position),
        "rel": scene.relation,
        "bg": _with_article(scene.background),
    }
    return template.format(**fields)


_OBJECT = re.compile(rf"\b(?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\b({'|'.join(BACKGROUNDS)}) background\b")


_ARTICLE = re.compile(r"\ban? (\w+)")
NEGATIVE_KINDS = ("shape", "colour", "size", "position", "relation", "background", "binding")
"""What a hard negative changes: one word or phrase of the caption, or (`binding`) the two objects' colours."""


def false_caption(scene: Scene, text: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A hard negative of `text` (a caption of `scene`): the same words but one attribute changed so that it
    is false of the scene — another shape, colour, size, position, relation or background, or the two
    objects' colours swapped — and the kind of change; None when the caption offers none.

    Contrastive training on random captions alone lets a text encoder ignore what the batch already tells
    apart without it (the "bag of words" failure, Yuksekgonul et al. 2023); captions that differ only in a
    position or a shape make it encode them."""
    edits: dict[str, list[tuple[tuple[int, int], list[str]]]] = {}

    def add(kind: str, span: tuple[int, int], options: list[str]) -> None:
        edits.setdefault(kind, []).append((span, options))

    matches = list(_OBJECT.finditer(text))
    for m in matches:
        if m[1]:
            add("size", m.span(1), [s for s in SIZES if s != m[1]])
        add("colour", m.span(2), [c for c in COLOURS if c != m[2]])
        add("shape", m.span(3), [s for s in SHAPES if s != m[3]])
    for o in scene.objects:
        start = text.find(f" {place(o.position)}") + 1
        if start:
            add("position", (start, start + len(place(o.position))), [place(p) for p in POSITIONS if p != o.position])
    if scene.relation is not None and f" {scene.relation} " in text:
        start = text.index(f" {scene.relation} ") + 1
        cells = [POSITIONS.index(o.position) for o in scene.objects]
        false = [r for r in RELATIONS if r not in relations_between(*cells)]
        add("relation", (start, start + len(scene.relation)), false)
    if background := _BACKGROUND.search(text):
        add("background", background.span(1), [b for b in BACKGROUNDS if b != background[1]])
    kinds = sorted(edits)
    # two objects of different shapes and colours: swapping their colours keeps every word and is false
    if len(matches) == 2 and matches[0][2] != matches[1][2] and matches[0][3] != matches[1][3]:
        kinds.append("binding")
    if not kinds:
        return None
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "binding":
        first, second = matches
        changed = text[: first.start(2)] + second[2] + text[first.end(2) : second.start(2)] + first[2]
        changed += text[second.end(2) :]
    else:
        (start, end), options = edits[kind][int(rng.integers(len(edits[kind])))]
        changed = text[:start] + options[int(rng.integers(len(options)))] + text[end:]
    # articles follow the new word ("an orange" → "a red"), or grammar alone would give the negative away
    return _ARTICLE.sub(lambda m: _with_article(m[1]), changed), kind


def parse_caption(text: str) -> dict[str, Any]:
    """What a caption says, in `Scene.labels()`'s form with None for what it leaves unsaid (a size, a
    position, the relation, the background): the reference an evaluator checks a generated image against."""
    objects, relation = [], None
    for match in _OBJECT.finditer(text):
        rest = text[match.end() :]
        position = next((p for p in POSITIONS if rest.startswith(f" {place(p)}")), None)
        said = next((r for r in RELATIONS if rest.startswith(f" {r} ")), None)
        relation = relation if said is None else RELATIONS.index(said)
        objects.append(
            {
                "shape": SHAPES.index(match[3]),
                "colour": list(COLOURS).index(match[2]),
                "size": None if match[1] is None else list(SIZES).index(match[1]),
                "position": None if position is None else POSITIONS.index(position),
            }
        )
    background = _BACKGROUND.search(text)
    return {
        "background": None if background is None else list(BACKGROUNDS).index(background[1]),
        "relation": relation,
        "objects": objects,
    }


# ---------------------------------------------------------------------------------------------- the dataset


def example(split: str, index: int, seed: int = 0) -> tuple[Scene, str]:
    """Sample `index` of `split`: its scene and caption, drawn from `(seed, split, index)` alone."""
    if split not in SPLITS:
        raise TurbokitError(f"unknown shapes split {split!r}: use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    holdout = {"heldout": "include", "evaluator": "any"}.get(split, "exclude")
    scene = sample_scene(rng, holdout=holdout)
    return scene, caption(scene, rng)


class ShapesSource:
    """`num_samples` scenes of one split, rendered on the fly: the trainer's `Source` protocol."""

    sample_size = None  # images: the loader resizes them (a no-op at their own size)

    def __init__(self, split: str, num_samples: int, size: int = 64, seed: int = 0) -> None:
        if split not in SPLITS:
            raise TurbokitError(f"unknown shapes split {split!r}: use one of {', '.join(SPLITS)}")
        if num_samples < 1 or size < 32 or seed < 0:
            raise TurbokitError(
                f"shapes needs at least one sample ({num_samples}), images of 32 pixels or more ({size}) "
                f"and a seed that is not negative ({seed})"
            )
        self.split, self.num_samples, self.size, self.seed = split, num_samples, size, seed
        self.name = f"shapes:{split}?n={num_samples}&size={size}&seed={seed}"
        self.skipped = SkippedSamples()

    def __len__(self) -> int:
        return self.num_samples

    def example(self, index: int) -> tuple[Scene, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} of {self.name}")
        return example(self.split, index, self.seed)

    def load(self, index: int) -> tuple[Image.Image, str]:
        scene, text = self.example(index)
        return render(scene, self.size), text


def parse_shapes_uri(text: str) -> ShapesSource | None:
    """`shapes:SPLIT?n=N&size=S&seed=K` (all but the split optional) as a source; None for any other text."""
    if not text.startswith("shapes:"):
        return None
    split, _, query = text.removeprefix("shapes:").partition("?")
    options = {"n": 10000, "size": 64, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options or not value.isdigit():
            raise TurbokitError(f"cannot read {text!r}: write shapes:train?n=20000&size=64&seed=0 (whole numbers)")
        options[key] = int(value)
    return ShapesSource(split or "train", options["n"], options["size"], options["seed"])


def write_folder(source: ShapesSource, path: str | Path) -> Path:
    """Cache a source as PNGs with same-name `.txt` captions (an image folder the trainer reads) and a
    `labels.jsonl` of `{"image", "text", "labels"}` lines (also readable as a JSONL source)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(source) - 1)))
    with open(root / "labels.jsonl", "w", encoding="utf-8") as lines:
        for index in range(len(source)):
            scene, text = source.example(index)
            name = f"{index:0{width}d}"
            render(scene, source.size).save(root / f"{name}.png")
            (root / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            lines.write(json.dumps({"image": f"{name}.png", "text": text, "labels": scene.labels()}) + "\n")
    return root
