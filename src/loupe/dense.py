"""Dense pretraining of a from-scratch vision tower on the built-in benchmark's scenes.

A real LLaVA starts from CLIP, whose patch tokens already say what is where; the
synth-tiny ViT starts from random weights and, trained only through the decoder's answers,
learns features that pool the image (colour, count, one legible tag) and lose what binding
a name to its object needs (its tokens end up 99.9% one vector shared by the whole image).
This stage teaches each image token what covers it: every patch of a 64 px scene, and of a
crop cut as the base's are (one HR tile's scale), is labelled with the colour-shape name of
the object covering most of it (or grey distractor, or background), the pattern of the tag
covering it (crops only: at 64 px every tag is the same blob) and its row and column; the
tower plus the projector learn a linear read-out of those labels from the token - the
conjunction "red circle" in one token, which the decoder's answer row can then find by
attention (`loupe reproduce --stage base --dense-tower`).

Shape legend: I images, S image side (px), P patches per side, N = P*P image tokens,
W projected width, C label classes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from loupe.data.synthetic import (
    COLOURS,
    PATTERNS,
    SHAPES,
    Obj,
    Scene,
    SynthConfig,
    _polygon,
    crop_window,
    make_scene,
    render,
    tag_centre,
)
from loupe.images import ImageProcessor
from loupe.vlm import VLM

# Label classes: background, a grey distractor, then every colour-shape name.
NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
CLASSES = ["background", "distractor", *NAMES]
IGNORE = -100  # a label not asked (cross_entropy's ignore_index)


def _mask(o: Obj, size: int) -> np.ndarray:
    """(size, size) bool: the pixels the object's shape covers at the master size."""
    image = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(image)
    if o.shape == "circle":
        draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=1)
    else:
        draw.polygon(_polygon(o), fill=1)
    return np.asarray(image, dtype=bool)


Window = tuple[int, int, int]  # (left, top, side) in master px: the part of the scene an image shows


def _cover(mask: np.ndarray, window: Window, grid: int) -> np.ndarray:
    """(grid*grid,) the share of each patch of `window` that `mask` (master px) covers."""
    left, top, side = window
    part = torch.from_numpy(mask[top:top + side, left:left + side].astype(np.float32))  # (side, side)
    return torch.nn.functional.adaptive_avg_pool2d(part[None], grid).flatten().numpy()


def _tag_mask(o: Obj, size: int, tag: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    cx, cy = tag_centre(o)
    mask[cy - tag // 2:cy - tag // 2 + tag, cx - tag // 2:cx - tag // 2 + tag] = True
    return mask


def patch_labels(scene: Scene, grid: int, window: Window | None = None, tag: int = 16,
                 min_cover: float = 0.15) -> torch.Tensor:
    """(2, grid*grid) labels of the patches of `window` (default: the whole scene), raster
    order: row 0, the `CLASSES` id of the object covering the largest share of each patch if
    that share is at least `min_cover` (else background); row 1, 1 + the `PATTERNS` index of
    the tag covering at least `min_cover` of it (else 0). `tag`: the tags' side (master px)."""
    size = scene.size
    window = window or (0, 0, size)
    labels = np.zeros((2, grid * grid), dtype=np.int64)
    best = np.full((2, grid * grid), min_cover)
    for o in [*scene.distractors, *scene.objects]:
        name = 1 if o.colour == "grey" else 2 + NAMES.index(f"{o.colour} {o.shape}")
        for row, (mask, cls) in enumerate([(_mask(o, size), name),
                                           (_tag_mask(o, size, tag), 1 + PATTERNS.index(o.pattern))]):
            cover = _cover(mask, window, grid)  # (N,)
            take = cover >= best[row]
            labels[row, take], best[row, take] = cls, cover[take]
    return torch.from_numpy(labels)


def dense_scenes(n: int, seed: int, cfg: SynthConfig, grid: int, crops: int = 1,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` fresh scenes (their own stream of `seed`), each at the native size and as `crops`
    crops cut as the base's are (`crop_window`: one HR tile's scale): pixels (I, 3, S, S) and
    patch labels (I, 2, N), I = n * (1 + crops); the whole scenes' patterns are `IGNORE`."""
    rng = random.Random(f"{seed}/dense")
    processor = ImageProcessor(size=cfg.native)
    pixels, labels = [], []
    for _ in tqdm(range(n), desc="dense scenes", unit="scene", disable=not progress, leave=False):
        scene = make_scene(rng, cfg)
        image = render(scene, cfg)
        windows = [(0, 0, scene.size)] + [crop_window(rng, rng.choice(scene.objects), cfg) for _ in range(crops)]
        for left, top, side in windows:
            view = image.crop((left, top, left + side, top + side)).resize((cfg.native, cfg.native),
                                                                         Image.Resampling.BICUBIC)
            pixels.append(processor(view))
            labels.append(patch_labels(scene, grid, (left, top, side), cfg.tag))
            if side == scene.size:  # at the native size every tag is the same grey blob: its pattern is not asked
                labels[-1][1] = IGNORE
    return torch.stack(pixels), torch.stack(labels)


@dataclass
class DenseConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    position_weight: float = 0.5  # of each token's row and column losses, beside its label's


def pretrain_dense(model: VLM, pixels: torch.Tensor, labels: torch.Tensor, cfg: DenseConfig,
                   seed: int = 0, progress: bool = True) -> tuple[list[float], torch.nn.Linear]:
    """Train the vision tower and projector (and a linear head over the projected tokens) to
    read each token's patch label; returns the loss per step and the head."""
    grid = math.isqrt(labels.shape[-1])
    outputs = [len(CLASSES), 1 + len(PATTERNS), grid, grid]  # name, pattern, row, column logits
    head = torch.nn.Linear(model.cfg.text.hidden_size, sum(outputs))
    params = [*model.vision_tower.parameters(), *model.projector.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * max(0.1, 0.5 * (1 + np.cos(np.pi * s / cfg.steps))))
    gen = torch.Generator().manual_seed(seed)
    idx_n = torch.arange(labels.shape[-1])
    rows, cols = idx_n // grid, idx_n % grid  # (N,)
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="dense", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(pixels), (cfg.batch_size,), generator=gen)
        logits = head(model.image_features(pixels[idx]))  # (I, N, C + 2P)
        name, pattern, row, col = logits.split(outputs, dim=-1)
        ce = torch.nn.functional.cross_entropy
        loss = (ce(name.flatten(0, 1), labels[idx, 0].flatten())
                + ce(pattern.flatten(0, 1), labels[idx, 1].flatten())
                + cfg.position_weight * (ce(row.flatten(0, 1), rows.repeat(len(idx)))
                                         + ce(col.flatten(0, 1), cols.repeat(len(idx)))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses, head


@torch.no_grad()
def dense_accuracy(model: VLM, head: torch.nn.Linear, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """% of the named objects' patches whose colour-shape name the head reads right, and of
    the tags' patches whose pattern it reads right."""
    logits = head(model.image_features(pixels))  # (I, N, C + ...)
    name = logits[..., :len(CLASSES)].argmax(-1)  # (I, N)
    pattern = logits[..., len(CLASSES):len(CLASSES) + 1 + len(PATTERNS)].argmax(-1)
    obj, tag = labels[:, 0] >= 2, labels[:, 1] >= 1
    return {"name": 100.0 * (name[obj] == labels[:, 0][obj]).float().mean().item(),
            "pattern": 100.0 * (pattern[tag] == labels[:, 1][tag]).float().mean().item()}
