"""A high-resolution VQA benchmark generated from a seed: scenes whose fine detail is
legible at high resolution and gone after downsampling to the model's native size, and
whose questions name objects that must be found before they can be read.

A scene holds 3-4 named objects and 0-2 grey distractors, placed uniformly (edges
included). Names must be bound: a scene draws its objects' colours from 2-3 colours and
their shapes from circle, square and triangle, so colours and shapes repeat and only the
pair names one object ("the red circle" beside a red square and a blue circle). Every
object carries a tag: a white square printed with one of four black patterns -
horizontal `stripes`, vertical `bars`, `checks`, diagonal `slashes` - of period 4 px at
the master size (`native * scale` px). All four patterns have the same ink coverage and
live above the native size's Nyquist limit, so after downsampling a tag is the same grey
blob whatever its pattern; at 3x the native size a tag is 12 px with a 3 px period,
which one native-size tile shows plainly.

Questions (LLaVA conversation format, metadata under "meta"; train: one multi-turn
conversation per image, val / test: one question per record):
    easy  where a named object is (a cell of a 3x3 grid: `top-left` ... `bottom-right`),
          the colour of the only object of a shape, the shape of the only object of a
          colour, counts - answerable at low resolution
    hard  the pattern on one named object - needs the high-resolution detail
each as short answer or multiple choice (four options, answer with the letter). Object
size follows the paper's split: small is under 5% of the image area. Every question
about an object carries its tag's box (`meta["tag_box"]`, fractions of the side).

Grounding questions teach the answer row to look at the named object: their answer is
its location. The train split also holds a caption record per scene (`caption: true`: every named object
and its grid cell, LLaVA's first-stage kind of data) and native-size crops (`crop: true`,
each with its own caption, patterns included) at the scale
of one high-resolution tile, each holding several objects with the one it is cut around
anywhere in it, not centred, so a model trained from scratch learns to read tags where
they are large enough (as CLIP has seen close-ups) and to read the named one, not the
one in the middle; validation and test hold whole scenes only.
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
CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
COUNT_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
LETTERS = "ABCD"
SMALL_AREA = 0.05  # the paper's object-size split: small objects cover under 5% of the image


@dataclass
class SynthConfig:
    native: int = 64  # the model's native image side (px)
    scale: int = 4  # images are written at native * scale px
    objects: tuple[int, int] = (3, 4)  # named objects per scene (min, max)
    colours: tuple[int, int] = (2, 3)  # colours per scene (min, max): names share colours and shapes
    distractors: tuple[int, int] = (0, 2)
    small: tuple[float, float] = (0.085, 0.1)  # radius range of a small object, fraction of the side
    large: tuple[float, float] = (0.14, 0.17)
    tag: int = 16  # tag side at the master size (px)
    period: int = 4  # pattern period at the master size (px)
    crops_per_scene: int = 2  # train split: native-size crops holding several objects
    captions: bool = True  # train split: a caption record per scene and per crop (for the base)

    def __post_init__(self) -> None:
        lo, hi = self.objects
        if not 1 <= lo <= hi <= 5:
            raise LoupeError(f"objects={self.objects}: named objects per scene must be within 1..5")
        if not 1 <= self.colours[0] <= self.colours[1] <= len(COLOURS) or self.colours[0] * len(SHAPES) < hi:
            raise LoupeError(f"colours={self.colours}: need 1..{len(COLOURS)} colours, enough that "
                             f"{hi} objects get distinct colour-shape names")

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


def _tag_offset(shape: str, r: float) -> float:
    """How far below the anchor point the tag sits: at the centroid (a triangle's is lower)."""
    return (r * math.sqrt(3) - r) / 3 if shape == "triangle" else 0.0


def tag_centre(o: Obj) -> tuple[int, int]:
    """Where the tag sits (master px)."""
    return round(o.x), round(o.y + _tag_offset(o.shape, o.r))


def _stamp_tag(canvas: np.ndarray, o: Obj, cfg: SynthConfig) -> None:
    cx, cy = tag_centre(o)
    top, left = cy - cfg.tag // 2, cx - cfg.tag // 2
    ink = pattern_mask(o.pattern, cfg.tag, cfg.period)
    tag = np.where(ink[..., None], 0, 255).astype(np.uint8)  # (tag, tag, 3): black ink on white
    canvas[top:top + cfg.tag, left:left + cfg.tag] = tag


# ---- scenes and questions ------------------------------------------------------------------
def _place(rng: random.Random, placed: list[Obj], shape: str, r: float, cfg: SynthConfig) -> tuple[float, float] | None:
    """A free spot for a radius-`r` object whose tag centre is uniform over the image, edges
    included (the shape may run off the image; its tag never does). None: no room."""
    margin = cfg.tag / 2 + 2
    for _ in range(200):
        x, ty = rng.uniform(margin, cfg.size - margin), rng.uniform(margin, cfg.size - margin)
        y = ty - _tag_offset(shape, r)
        if all(math.hypot(x - p.x, y - p.y) > r + p.r + 3 for p in placed):
            return x, y
    return None


def make_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """Named objects with distinct colour-shape names drawn from few colours, then distractors."""
    size = cfg.size
    for _ in range(50):  # a scene whose named objects do not all fit is drawn again
        n = rng.randint(*cfg.objects)
        palette = rng.sample(list(COLOURS), rng.randint(*cfg.colours))
        names = rng.sample([(c, s) for c in palette for s in SHAPES], n)
        placed: list[Obj] = []
        for colour, shape in names:
            r = rng.uniform(*(cfg.small if rng.random() < 0.5 else cfg.large)) * size
            spot = _place(rng, placed, shape, r, cfg)
            if spot is None:
                break
            placed.append(Obj(shape, colour, rng.choice(PATTERNS), *spot, r))
        if len(placed) < n:
            continue
        distractors: list[Obj] = []
        for _ in range(rng.randint(*cfg.distractors)):
            r, shape = rng.uniform(*cfg.small) * size, rng.choice(SHAPES)
            spot = _place(rng, placed + distractors, shape, r, cfg)
            if spot is not None:  # no room: fewer distractors
                distractors.append(Obj(shape, "grey", rng.choice(PATTERNS), *spot, r))
        background = tuple(rng.randint(200, 245) for _ in range(3))
        return Scene(placed, distractors, background, rng.getrandbits(32), size)
    raise LoupeError(f"could not place {cfg.objects[1]} objects of radius up to {cfg.large[1]} of the side; "
                     "use fewer or smaller objects")


def _name(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _size_class(o: Obj, image_side: int) -> str:
    return "small" if o.area() / image_side**2 < SMALL_AREA else "large"


def tag_box(o: Obj, side: int, tag: int, origin: tuple[int, int] = (0, 0)) -> list[float]:
    """The object's tag as [left, top, right, bottom], fractions of the (square) image side;
    `origin`: the image's top-left corner in master px (a crop's)."""
    cx, cy = tag_centre(o)
    left, top = cx - tag // 2 - origin[0], cy - tag // 2 - origin[1]
    return [round(v / side, 5) for v in (left, top, left + tag, top + tag)]


def cell(box: list[float]) -> str:
    """The 3x3 grid cell holding the centre of `box` (fractions of the side)."""
    col, row = (min(2, max(0, int(3 * (box[i] + box[i + 2]) / 2))) for i in (0, 1))
    return CELLS[3 * row + col]


@dataclass
class Subject:
    """What a question is about: an object as it appears in one image (a scene or a crop)."""

    obj: Obj
    box: list[float]  # its tag, fractions of that image's side
    area_fraction: float  # of that image


def subject(o: Obj, side: int, tag: int, origin: tuple[int, int] = (0, 0)) -> Subject:
    return Subject(o, tag_box(o, side, tag, origin), o.area() / side**2)


def _question(rng: random.Random, text: str, answer: str, options: list[str], kind: str, subtype: str,
              about: Subject | None, mc: bool) -> dict[str, Any]:
    size = "scene" if about is None else "small" if about.area_fraction < SMALL_AREA else "large"
    meta: dict[str, Any] = {"kind": kind, "type": subtype, "format": "mc" if mc else "short",
                            "answer_text": answer, "size": size}
    if about is not None:  # where the named object's tag is (oracle selection, tag hits)
        meta["area_fraction"] = round(about.area_fraction, 4)
        meta["tag_box"] = about.box
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


def pattern_question(rng: random.Random, about: Subject, mc: bool) -> dict[str, Any]:
    return _question(rng, f"What pattern is on the {_name(about.obj)}?", about.obj.pattern, list(PATTERNS), "hard",
                     "pattern", about, mc)


def where_question(rng: random.Random, about: Subject, mc: bool) -> dict[str, Any]:
    return _question(rng, f"Where is the {_name(about.obj)}?", cell(about.box), list(CELLS), "easy", "where",
                     about, mc)


def _attribute_question(rng: random.Random, about: Subject, scene: Scene, mc: bool) -> dict[str, Any] | None:
    """The colour of the only object of its shape, or the shape of the only one of its colour."""
    o = about.obj
    if [p.shape for p in scene.objects].count(o.shape) == 1:
        return _question(rng, f"What colour is the {o.shape}?", o.colour, list(COLOURS), "easy", "colour", about, mc)
    if [p.colour for p in scene.objects].count(o.colour) == 1:
        return _question(rng, f"What shape is the {o.colour} object?", o.shape, [*SHAPES, "star"], "easy", "shape",
                         about, mc)
    return None


def _count_question(rng: random.Random, scene: Scene, mc: bool) -> dict[str, Any]:
    colours = [o.colour for o in scene.objects]
    if rng.random() < 0.5:
        colour = rng.choice(colours)
        return _question(rng, f"How many {colour} objects are there?", COUNT_WORDS[colours.count(colour)],
                         list(COUNT_WORDS.values()), "easy", "count", None, mc)
    return _question(rng, "How many coloured shapes are there?", COUNT_WORDS[len(colours)],
                     list(COUNT_WORDS.values()), "easy", "count", None, mc)


def scene_questions(rng: random.Random, scene: Scene, tag: int = 16) -> list[dict[str, Any]]:
    """Per named object a hard question and an easy one (where it is, or - when the name
    allows - its colour or shape), plus a count question; `tag`: the tags' side at the master
    size (for the tag boxes in the metadata)."""
    out = []
    for o in scene.objects:
        about = subject(o, scene.size, tag)
        out.append(pattern_question(rng, about, rng.random() < 0.5))
        attribute = _attribute_question(rng, about, scene, rng.random() < 0.5) if rng.random() < 0.3 else None
        out.append(attribute or where_question(rng, about, rng.random() < 0.5))
    out.append(_count_question(rng, scene, rng.random() < 0.5))
    return out


def caption(subjects: list[Subject], patterns: bool) -> dict[str, Any]:
    """A description of the image, LLaVA's first-stage (caption) kind of supervision: every
    named object with where it is and - in a crop, where tags are legible - its pattern, in
    reading order. Every token of it depends on the image, which is what lets a model trained
    from scratch start using the image soon."""
    ordered = sorted(subjects, key=lambda a: (CELLS.index(cell(a.box)), a.box[0]))
    parts = [f"{_name(a.obj)} {cell(a.box)}" + (f" {a.obj.pattern}" if patterns else "") for a in ordered]
    text = "List the objects, where they are and their patterns." if patterns else \
        "List the objects and where they are."
    answer = ", ".join(parts) if parts else "none"
    return {"question": text, "answer": answer,
            "meta": {"kind": "caption", "type": "caption", "format": "long", "answer_text": answer, "size": "scene"}}


EVAL_EASY = 2  # easy questions per validation / test scene: hard ones are what the splits must resolve


def eval_questions(rng: random.Random, questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A scene's questions in a validation or test split: every hard one and EVAL_EASY easy
    ones drawn at random, in their original order."""
    easy = [i for i, q in enumerate(questions) if q["meta"]["kind"] == "easy"]
    keep = set(rng.sample(easy, min(EVAL_EASY, len(easy))))
    return [q for i, q in enumerate(questions) if q["meta"]["kind"] == "hard" or i in keep]


def crop_window(rng: random.Random, o: Obj, cfg: SynthConfig) -> tuple[int, int, int]:
    """(left, top, side) of a square window, 1x-1.5x the native size at master scale (one HR
    tile at 4x-2.7x, where a tag's period is 3-4 px), holding `o`'s tag anywhere inside it
    (uniformly, not centred)."""
    w = rng.randint(cfg.native, 3 * cfg.native // 2)
    cx, cy = tag_centre(o)
    half = cfg.tag // 2

    def start(c: int) -> int:
        lo, hi = max(0, c + half + 1 - w), min(cfg.size - w, c - half - 1)
        return rng.randint(lo, max(lo, hi))

    return start(cx), start(cy), w


def _inside(o: Obj, left: int, top: int, w: int, tag: int) -> bool:
    cx, cy = tag_centre(o)
    return left <= cx - tag // 2 and cx + tag // 2 <= left + w and top <= cy - tag // 2 and cy + tag // 2 <= top + w
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
                  progress: bool = True, splits: tuple[str, ...] = SPLITS) -> Path:
    """Write `out`/{split}.json for each of `splits` and `out`/images/*.png; returns `out`.
    A split's scenes depend only on the seed and the split (not on `n` or on the other splits)."""
    cfg = cfg or SynthConfig()
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise LoupeError(f"unknown splits {unknown}; choose from {list(SPLITS)}")
    sizes = {split: k for split, k in split_sizes(n).items() if split in splits}
    bar = tqdm(total=sum(sizes.values()), desc="synth", unit="scene", disable=not progress)
    for split_index, split in enumerate(SPLITS):
        if split not in splits:
            continue
        rng = random.Random(f"{seed}/{split_index}")  # splits are independent streams of the same seed
        rows: list[dict[str, Any]] = []
        for i in range(sizes[split]):
            scene = make_scene(rng, cfg)
            image = render(scene, cfg)
            name = f"{split}_{i:05d}"
            image.save(images / f"{name}.png")
            questions = scene_questions(rng, scene, cfg.tag)
            if split == "train":  # one multi-turn conversation per image, as LLaVA's instruction data
                rng.shuffle(questions)
                rows.append(conversation_record(name, f"images/{name}.png", questions))
            else:  # one question per record, scored on its own: every hard one, EVAL_EASY easy ones
                rows.extend(record(f"{name}_q{j}", f"images/{name}.png", q, scene=name)
                            for j, q in enumerate(eval_questions(rng, questions)))
            if split == "train":
                rows.extend(_crop_rows(rng, image, scene, cfg, images, name))
                if cfg.captions:  # its own record: later turns could otherwise copy answers from it
                    about = [subject(o, scene.size, cfg.tag) for o in scene.objects]
                    rows.append(conversation_record(f"{name}_caption", f"images/{name}.png",
                                                    [caption(about, patterns=False)], scene=name, caption=True))
            bar.update()
        write_json(out / f"{split}.json", rows)
    bar.close()
    write_json(out / "synth.json", {"n": n, "seed": seed, "config": asdict(cfg), "splits": sizes})
    return out


def _crop_rows(rng: random.Random, image: Image.Image, scene: Scene, cfg: SynthConfig, images: Path,
               name: str) -> list[dict[str, Any]]:
    """Native-size crops around objects: a pattern question on every named object whose tag
    lies inside, and where (in the crop) the one it was cut around is."""
    rows = []
    for k in range(cfg.crops_per_scene):
        anchor = rng.choice(scene.objects)
        left, top, w = crop_window(rng, anchor, cfg)
        crop_name = f"{name}_crop{k}"
        crop = image.crop((left, top, left + w, top + w)).resize((cfg.native, cfg.native), Image.Resampling.BICUBIC)
        crop.save(images / f"{crop_name}.png")
        inside = [o for o in scene.objects if _inside(o, left, top, w, cfg.tag)]
        qs = [pattern_question(rng, subject(o, w, cfg.tag, (left, top)), rng.random() < 0.5) for o in inside]
        qs.append(where_question(rng, subject(anchor, w, cfg.tag, (left, top)), rng.random() < 0.5))
        rng.shuffle(qs)
        rows.append(conversation_record(crop_name, f"images/{crop_name}.png", qs, scene=name, crop=True))
        if cfg.captions:
            about = [subject(o, w, cfg.tag, (left, top)) for o in inside]
            rows.append(conversation_record(f"{crop_name}_caption", f"images/{crop_name}.png",
                                            [caption(about, patterns=True)], scene=name, crop=True, caption=True))
    return rows


MAX_NATIVE = 512


def synth_dataset(out: str | Path, n: int, seed: int = 0, native: int = 64, overwrite: bool = False,
                  progress: bool = True) -> dict[str, int]:
    """`loupe data synth`: the benchmark for a model of native side `native` in `out`;
    returns the records per split."""
    out = Path(out)
    if (out / "train.json").exists() and not overwrite:
        raise LoupeError(f"{out} already holds a dataset; pass --overwrite to replace it")
    if not 16 <= native <= MAX_NATIVE or native % 8:  # above it a scene takes minutes to draw (4096: hours)
        raise LoupeError(f"--native {native} must be a multiple of 8 in 16..{MAX_NATIVE} (images are 4x that)")
    write_dataset(out, n, seed, SynthConfig(native=native), progress)
    return {split: len(json.loads((out / f"{split}.json").read_text())) for split in SPLITS}
