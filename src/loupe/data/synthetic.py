"""A high-resolution VQA benchmark generated from a seed: scenes whose fine detail is
legible at high resolution and gone after downsampling to the model's native size.

A scene holds 2-4 objects (circle, square, triangle; distinct colours; small or large)
and 1-2 grey distractors. Every object carries a tag: a white square printed with one of
four black patterns - horizontal `stripes`, vertical `bars`, `checks`, diagonal
`slashes` - of period 4 px at the master size (`native * scale` px). All four patterns
have the same ink coverage and live above the native size's Nyquist limit, so after
downsampling a tag is the same grey blob whatever its pattern; at 3x the native size a
tag is 12 px with a 3 px period, which one native-size tile shows plainly.

Questions (LLaVA conversation format, metadata under "meta"; train: one multi-turn
conversation per image, val / test: one question per record):
    easy  colour / shape / left-right position / count - answerable at low resolution
    hard  the pattern on one named object - needs the high-resolution detail
each as short answer or multiple choice (four options, answer with the letter). Object
size follows the paper's split: small is under 5% of the image area.

The train split also holds native-size crops around objects (`crop: true`), so a model
trained from scratch learns to read tags where they are large enough, as CLIP has seen
close-ups; validation and test hold whole scenes only.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from loupe.errors import LoupeError
from loupe.files import write_json

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "orange": (240, 130, 30)}
DISTRACTOR = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("stripes", "bars", "checks", "slashes")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
LETTERS = "ABCD"
SMALL_AREA = 0.05  # the paper's object-size split: small objects cover under 5% of the image


@dataclass
class SynthConfig:
    native: int = 64  # the model's native image side (px)
    scale: int = 4  # images are written at native * scale px
    objects: tuple[int, int] = (2, 4)  # named objects per scene (min, max)
    distractors: tuple[int, int] = (1, 2)
    tag: int = 16  # tag side at the master size (px)
    period: int = 4  # pattern period at the master size (px)
    crops_per_scene: int = 2  # train split: native-size crops around objects

    @property
    def size(self) -> int:
        return self.native * self.scale


@dataclass
class Obj:
    shape: str
    colour: str  # a COLOURS name, or "grey" for a distractor
    pattern: str
    x: float  # centre, in master px
    y: float
    r: float  # radius (half the side of the bounding square)

    def area(self) -> float:
        """In master px^2 (the triangle: base 2r, height r + r*sqrt(3)/2)."""
        return {"circle": math.pi, "square": 4.0, "triangle": 1 + math.sqrt(3) / 2}[self.shape] * self.r**2


@dataclass
class Scene:
    objects: list[Obj]
    distractors: list[Obj]
    background: tuple[int, int, int]
    noise_seed: int
    size: int
    meta: dict[str, Any] = field(default_factory=dict)


# ---- drawing ------------------------------------------------------------------------------
def pattern_mask(name: str, side: int, period: int) -> np.ndarray:
    """(side, side) bool ink mask; every pattern covers half the tag."""
    y, x = np.mgrid[0:side, 0:side]
    half = period // 2
    ink = {
        "stripes": (y // half) % 2 == 0,
        "bars": (x // half) % 2 == 0,
        "checks": ((x // half) + (y // half)) % 2 == 0,
        "slashes": ((x + y) // half) % 2 == 0,
    }
    if name not in ink:
        raise LoupeError(f"unknown pattern {name!r}; choose one of {list(PATTERNS)}")
    return ink[name]


def _polygon(o: Obj) -> list[tuple[float, float]]:
    if o.shape == "square":
        return [(o.x - o.r, o.y - o.r), (o.x + o.r, o.y - o.r), (o.x + o.r, o.y + o.r), (o.x - o.r, o.y + o.r)]
    h = o.r * math.sqrt(3) / 2  # triangle: apex r above the anchor, base 2r wide, h below it
    return [(o.x, o.y - o.r), (o.x + o.r, o.y + h), (o.x - o.r, o.y + h)]


def render(scene: Scene, cfg: SynthConfig) -> Image.Image:
    """The scene at the master size: background with mild noise, shapes, tags."""
    rng = np.random.default_rng(scene.noise_seed)
    base = np.array(scene.background, dtype=np.float32)
    pixels = base + rng.normal(0, 6, (scene.size, scene.size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for o in [*scene.distractors, *scene.objects]:
        fill = COLOURS.get(o.colour, DISTRACTOR)
        if o.shape == "circle":
            draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
        else:
            draw.polygon(_polygon(o), fill=fill)
    canvas = np.asarray(image).copy()
    for o in [*scene.distractors, *scene.objects]:
        _stamp_tag(canvas, o, cfg)
    return Image.fromarray(canvas)


def tag_centre(o: Obj) -> tuple[int, int]:
    """Where the tag sits: the centroid (a triangle's lies below its anchor point)."""
    dy = (o.r * math.sqrt(3) - o.r) / 3 if o.shape == "triangle" else 0.0
    return round(o.x), round(o.y + dy)


def _stamp_tag(canvas: np.ndarray, o: Obj, cfg: SynthConfig) -> None:
    cx, cy = tag_centre(o)
    top, left = cy - cfg.tag // 2, cx - cfg.tag // 2
    ink = pattern_mask(o.pattern, cfg.tag, cfg.period)
    tag = np.where(ink[..., None], 0, 255).astype(np.uint8)  # (tag, tag, 3): black ink on white
    canvas[top:top + cfg.tag, left:left + cfg.tag] = tag


# ---- scenes and questions ------------------------------------------------------------------
def make_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    size = cfg.size
    n = rng.randint(*cfg.objects)
    colours = rng.sample(list(COLOURS), n)
    placed: list[Obj] = []
    for i in range(n + rng.randint(*cfg.distractors)):
        distractor = i >= n
        for _ in range(200):  # rejection sampling of a free spot
            small = distractor or rng.random() < 0.5
            r = rng.uniform(0.085, 0.105) * size if small else rng.uniform(0.15, 0.21) * size
            x, y = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all(math.hypot(x - p.x, y - p.y) > r + p.r + 4 for p in placed):
                break
        else:
            continue  # no room: fewer distractors (named objects always fit at these sizes)
        placed.append(Obj(rng.choice(SHAPES), "grey" if distractor else colours[i], rng.choice(PATTERNS), x, y, r))
    objects = [o for o in placed if o.colour != "grey"]
    if len(objects) < n:
        raise LoupeError("scene generation failed to place every object; use fewer objects per scene")
    background = tuple(rng.randint(200, 245) for _ in range(3))
    return Scene(objects, [o for o in placed if o.colour == "grey"], background, rng.getrandbits(32), size)


def _name(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _size_class(o: Obj, image_side: int) -> str:
    return "small" if o.area() / image_side**2 < SMALL_AREA else "large"


def tag_box(o: Obj, side: int, tag: int) -> list[float]:
    """The object's tag as [left, top, right, bottom], fractions of the (square) image side."""
    cx, cy = tag_centre(o)
    left, top = cx - tag // 2, cy - tag // 2
    return [round(v / side, 5) for v in (left, top, left + tag, top + tag)]


def _question(rng: random.Random, text: str, answer: str, options: list[str], kind: str, subtype: str,
              obj: Obj | None, side: int, mc: bool, tag: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": kind, "type": subtype, "format": "mc" if mc else "short",
                            "answer_text": answer, "size": _size_class(obj, side) if obj else "scene"}
    if obj is not None:
        meta["area_fraction"] = round(obj.area() / side**2, 4)
        if tag is not None:  # where the named object's tag is in the image (oracle selection, tag hits)
            meta["tag_box"] = tag_box(obj, side, tag)
    if mc:
        choices = rng.sample([o for o in options if o != answer], 3) + [answer]
        rng.shuffle(choices)
        listed = " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        text = f"{text} Options: {listed}. Answer with the letter."
        answer = LETTERS[choices.index(answer)]
        meta["options"] = choices
    else:
        text = f"{text} Answer with one word."
        meta["options"] = options
    return {"question": text, "answer": answer, "meta": meta}


def scene_questions(rng: random.Random, scene: Scene, hard_per_object: int = 1,
                    tag: int = 16) -> list[dict[str, Any]]:
    """One hard and one easy question per named object, plus a count question; `tag`: the
    tags' side at the master size (for the tag boxes in the metadata)."""
    side, out = scene.size, []
    shapes = [o.shape for o in scene.objects]
    for o in scene.objects:
        for _ in range(hard_per_object):
            out.append(_question(rng, f"What pattern is on the {_name(o)}?", o.pattern, list(PATTERNS), "hard",
                                 "pattern", o, side, rng.random() < 0.5, tag))
        kinds = ["colour", "shape"] + (["position"] if abs(o.x - side / 2) > side / 8 else [])
        kind = rng.choice(kinds)
        mc = rng.random() < 0.5
        if kind == "colour" and shapes.count(o.shape) == 1:
            out.append(_question(rng, f"What colour is the {o.shape}?", o.colour, list(COLOURS), "easy", "colour",
                                 o, side, mc, tag))
        elif kind in ("colour", "shape"):
            out.append(_question(rng, f"What shape is the {o.colour} object?", o.shape, [*SHAPES, "star"], "easy",
                                 "shape", o, side, mc, tag))
        else:
            where = "left" if o.x < side / 2 else "right"
            out.append(_question(rng, f"Is the {_name(o)} on the left or on the right?", where,
                                 ["left", "right", "top", "bottom"], "easy", "position", o, side, mc, tag))
    n = len(scene.objects)
    out.append(_question(rng, "How many coloured shapes are there?", COUNT_WORDS[n], list(COUNT_WORDS.values()),
                         "easy", "count", None, side, rng.random() < 0.5, tag))
    return out


def crop_around(rng: random.Random, image: Image.Image, o: Obj, cfg: SynthConfig) -> Image.Image:
    """A square window around the object's tag (1x-2x the native size at master scale,
    i.e. the scale of one HR tile at 4x-2x), resized to the native size."""
    w = rng.randint(cfg.native, 2 * cfg.native)
    cx, cy = tag_centre(o)
    jitter = w // 4
    left = min(max(0, cx - w // 2 + rng.randint(-jitter, jitter)), image.width - w)
    top = min(max(0, cy - w // 2 + rng.randint(-jitter, jitter)), image.height - w)
    crop = image.crop((left, top, left + w, top + w))
    return crop.resize((cfg.native, cfg.native), Image.Resampling.BICUBIC)


# ---- writing a dataset ----------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def split_sizes(n: int) -> dict[str, int]:
    """Scenes per split for `n` training scenes: validation n/10, test n/5 (at least 20 each)."""
    if n < 1:
        raise LoupeError(f"--n {n}: the number of training scenes must be at least 1")
    return {"train": n, "val": max(20, n // 10), "test": max(20, n // 5)}


def record(rid: str, image: str, q: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                              {"from": "gpt", "value": q["answer"]}],
            "meta": {**q["meta"], **meta}}


def conversation_record(rid: str, image: str, questions: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """All questions about one image as one conversation (the image in the first turn)."""
    turns: list[dict[str, str]] = []
    for k, q in enumerate(questions):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q["question"]},
                  {"from": "gpt", "value": q["answer"]}]
    return {"id": rid, "image": image, "conversations": turns,
            "meta": {"turns": [q["meta"] for q in questions], **meta}}


def write_dataset(out: str | Path, n: int, seed: int = 0, cfg: SynthConfig | None = None,
                  progress: bool = True) -> Path:
    """Write `out`/{train,val,test}.json and `out`/images/*.png; returns `out`."""
    cfg = cfg or SynthConfig()
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(n)
    bar = tqdm(total=sum(sizes.values()), desc="synth", unit="scene", disable=not progress)
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(f"{seed}/{split_index}")  # splits are independent streams of the same seed
        rows: list[dict[str, Any]] = []
        for i in range(sizes[split]):
            scene = make_scene(rng, cfg)
            image = render(scene, cfg)
            name = f"{split}_{i:05d}"
            image.save(images / f"{name}.png")
            questions = scene_questions(rng, scene, tag=cfg.tag)
            if split == "train":  # one multi-turn conversation per image, as LLaVA's instruction data
                rng.shuffle(questions)
                rows.append(conversation_record(name, f"images/{name}.png", questions))
            else:  # one question per record: every question scored on its own
                rows.extend(record(f"{name}_q{j}", f"images/{name}.png", q, scene=name)
                            for j, q in enumerate(questions))
            if split == "train":
                rows.extend(_crop_rows(rng, image, scene, cfg, images, name))
            bar.update()
        write_json(out / f"{split}.json", rows)
    bar.close()
    write_json(out / "synth.json", {"n": n, "seed": seed, "config": asdict(cfg), "splits": sizes})
    return out


def _crop_rows(rng: random.Random, image: Image.Image, scene: Scene, cfg: SynthConfig, images: Path,
               name: str) -> list[dict[str, Any]]:
    rows = []
    for k in range(cfg.crops_per_scene):
        o = rng.choice(scene.objects)
        crop_name = f"{name}_crop{k}"
        crop_around(rng, image, o, cfg).save(images / f"{crop_name}.png")
        text = f"What pattern is on the {_name(o)}?"
        qs = [_question(rng, text, o.pattern, list(PATTERNS), "hard", "pattern", o, scene.size, mc, None)
              for mc in (0, 1)]  # a crop's questions carry no tag box: it is not where the scene's tag is
        rows.append(conversation_record(f"{crop_name}", f"images/{crop_name}.png", qs, scene=name, crop=True))
    return rows


def synth_dataset(out: str | Path, n: int, seed: int = 0, native: int = 64, overwrite: bool = False,
                  progress: bool = True) -> dict[str, int]:
    """`loupe data synth`: the benchmark for a model of native side `native` in `out`;
    returns the records per split."""
    out = Path(out)
    if (out / "train.json").exists() and not overwrite:
        raise LoupeError(f"{out} already holds a dataset; pass --overwrite to replace it")
    if native < 16 or native % 8:
        raise LoupeError(f"--native {native} must be a multiple of 8, at least 16")
    write_dataset(out, n, seed, SynthConfig(native=native), progress)
    return {split: len(json.loads((out / f"{split}.json").read_text())) for split in SPLITS}
