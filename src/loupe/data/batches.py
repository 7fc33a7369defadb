"""What training reads: tokenised samples, padded batches, the plan of which samples each
step and process takes, and a dataset that loads images lazily in `DataLoader` workers.

Shape legend: B batch, T sequence (prompt + answers, left-padded), I images (tiles for AnyRes),
R grounded turns (the most of any row of the batch).

Samples are tokenised once at load, through the model's chat template (`loupe.chat`), so a
row longer than the maximum length is reported with its row before step 0. Images are read
only when a batch needs them: the LLaVA-1.5 mix at 336 px is ~0.6 TB of pixels, its 665k
conversations' ids a few hundred MB.

The step plan is a pure function of (seed, step): a run killed at step k and resumed draws
the very batches it would have drawn, at any process count (`StepPlan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from loupe.chat import template_for
from loupe.data.llava import Example
from loupe.errors import LoupeError
from loupe.grounding import answer_rows, turn_boxes
from loupe.images import load_image
from loupe.text import Tokenizer

if TYPE_CHECKING:
    from loupe.vlm import VLM


# ---- tokenised samples --------------------------------------------------------------------
@dataclass
class Sample:
    ids: list[int]  # prompt and answers, <image> expanded
    scored: list[bool]  # True at the answer tokens (and the token ending each)
    image: int | None  # index into the image source; None: a text-only conversation
    example: Example | None = None
    # (row predicting the turn's first answer token, its grounding box) for each grounded turn
    # (`loupe.grounding`: the records' boxes; empty for data without them)
    grounds: list[tuple[int, list[float]]] = field(default_factory=list)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first answer token."""
        return self.scored.index(True)


def image_tokens(model: VLM, ex: Example) -> int:
    """<image> ids `model` takes for the example's image (0 without one)."""
    return 0 if ex.image is None else model.packing.image_tokens(ex.image, model.method)


def sample_of(model: VLM, ex: Example, tok: Tokenizer, image: int | None) -> Sample:
    ids, scored = template_for(model.cfg).conversation(ex.turns, tok, image_tokens(model, ex), ex.image is not None)
    boxes = turn_boxes(ex.meta, len(ex.turns)) if ex.image is not None else []
    grounds = [(row, box) for row, box in zip(answer_rows(scored), boxes, strict=False) if box is not None]
    return Sample(ids, scored, image, ex, grounds)


def prompt_ids(model: VLM, ex: Example, tok: Tokenizer) -> list[int]:
    """The example's first question as `model` is asked it (equal to the start of `sample_of`'s ids)."""
    return template_for(model.cfg).prompt_ids(ex.question, tok, image_tokens(model, ex), ex.image is not None)


def tokenize(examples: Sequence[Example], tok: Tokenizer, model: VLM,
             max_length: int | None = None) -> tuple[list[Sample], list[Path]]:
    """Samples and the distinct image paths they index. A conversation longer than
    `max_length` (default: the model's positions) is refused here, naming its row."""
    limit = max_length or model.cfg.text.max_position_embeddings
    paths: dict[Path, int] = {}
    samples = []
    for row, ex in enumerate(examples):
        image = None if ex.image is None else paths.setdefault(ex.image, len(paths))
        sample = sample_of(model, ex, tok, image)
        if len(sample.ids) > limit:
            raise LoupeError(f"row {row} (id {ex.id!r}) is {len(sample.ids)} tokens with its image, longer than "
                             f"the maximum length {limit}; raise max_length or drop the row")
        samples.append(sample)
    return samples, list(paths)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    loss_rows: torch.Tensor  # (B, T) True where the next token is scored
    targets: torch.Tensor  # (B, T) the next token (0 where not scored)
    images: list[int] = field(default_factory=list)  # image indices of the rows that have one, in row order
    ground_rows: torch.Tensor | None = None  # (B, R) rows predicting a grounded turn's first answer token
    ground_boxes: torch.Tensor | None = None  # (B, R, 4) their boxes, fractions of the image side
    ground_valid: torch.Tensor | None = None  # (B, R) False at padding

    @property
    def scored_tokens(self) -> int:
        return int(self.loss_rows.sum())

    @property
    def grounded_rows(self) -> int:
        return 0 if self.ground_valid is None else int(self.ground_valid.sum())


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    t = max(len(s.ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    scored = torch.zeros(b, t, dtype=torch.bool)
    for row, s in enumerate(samples):
        ids[row, t - len(s.ids):] = torch.tensor(s.ids)
        mask[row, t - len(s.ids):] = 1
        scored[row, t - len(s.ids):] = torch.tensor(s.scored)
    loss_rows = torch.zeros_like(scored)
    loss_rows[:, :-1] = scored[:, 1:]  # row t predicts token t + 1
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    return Batch(ids, mask, loss_rows, targets.masked_fill(~loss_rows, 0),
                 [s.image for s in samples if s.image is not None], *_grounds(samples, t))


def _grounds(samples: Sequence[Sample], t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grounded rows (B, R) in the left-padded batch of length t, their boxes (B, R, 4), validity (B, R)."""
    r = max(len(s.grounds) for s in samples)
    rows = torch.zeros(len(samples), r, dtype=torch.long)
    boxes = torch.zeros(len(samples), r, 4)
    valid = torch.zeros(len(samples), r, dtype=torch.bool)
    for b, s in enumerate(samples):
        for k, (row, box) in enumerate(s.grounds):
            rows[b, k], boxes[b, k], valid[b, k] = row + t - len(s.ids), torch.tensor(box), True
    return rows, boxes, valid


@dataclass
class ImageBatch:
    """The images of a batch as `VLM.forward` takes them: pixels, or features already encoded."""

    pixel_values: torch.Tensor | None = None  # (I, 3, S, S); AnyRes: (I, P, 3, s, s)
    images: object | None = None  # `loupe.methods.ImageInputs`, encoded already
    image_sizes: torch.Tensor | None = None  # (I, 2) original (height, width), with pixel_values


MicroBatch = tuple[Batch, ImageBatch]


# ---- which samples each step takes ------------------------------------------------------------
@dataclass
class StepPlan:
    """The global batch of every step: epoch e is a permutation drawn from (seed, e), cut into
    `n // batch_size` batches (the rest of an epoch is dropped). With `lengths`, samples are
    grouped by length as LLaVA's `group_by_modality_length` does (megabatches of 50 batches
    sorted longest first, then the batches shuffled), so a batch pads little."""

    n: int
    batch_size: int
    seed: int
    lengths: Sequence[int] | None = None
    _epoch: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False)  # the last epoch drawn

    MEGABATCH = 50  # batches per length-sorted megabatch

    def __post_init__(self) -> None:
        if self.n == 0:
            raise LoupeError("the training set is empty")
        if self.n < self.batch_size:
            raise LoupeError(f"the training set has {self.n} samples, fewer than one batch of {self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def epoch_of(self, step: int) -> float:
        return step / self.batches_per_epoch

    def global_batch(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._batches(epoch))
        return self._epoch[1][j]

    def _batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        b = self.batch_size
        if self.lengths is not None:
            mega = b * self.MEGABATCH
            order = [i for start in range(0, self.n, mega)
                     for i in sorted(order[start:start + mega], key=lambda i: -self.lengths[i])]  # type: ignore[index]
        batches = [order[k * b:(k + 1) * b] for k in range(self.batches_per_epoch)]
        if self.lengths is not None:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def rank_batches(self, step: int, rank: int, world: int, micro: int) -> list[list[int]]:
        """This process's micro-batches of the step's global batch: its contiguous share of
        `batch_size / world` samples, in micro-batches of `micro`."""
        mine = self.global_batch(step)[rank * (self.batch_size // world):(rank + 1) * (self.batch_size // world)]
        return [mine[k:k + micro] for k in range(0, len(mine), micro)]


# ---- a dataset that reads images lazily --------------------------------------------------------
class LazyImages(torch.utils.data.Dataset):
    """Sample i with its image read from disk (None for a text-only one); a `DataLoader`
    worker opens and preprocesses images while the model trains."""

    def __init__(self, samples: Sequence[Sample], paths: Sequence[Path]) -> None:
        self.samples, self.paths = samples, paths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Sample, Image.Image | None]:
        s = self.samples[i]
        return s, None if s.image is None else load_image(self.paths[s.image])


def pixel_collate(model: VLM, pad_id: int) -> Callable[[list[tuple[Sample, Image.Image | None]]], MicroBatch]:
    """Collate for `LazyImages`: the padded batch and the model family's preprocessing of its images."""

    def collate_fn(items: list[tuple[Sample, Image.Image | None]]) -> MicroBatch:
        batch = collate([s for s, _ in items], pad_id)
        pictures = [im for _, im in items if im is not None]
        if not pictures:
            return batch, ImageBatch()
        prepared = model.prepare_images(pictures)
        return batch, ImageBatch(pixel_values=prepared.pixel_values, image_sizes=prepared.image_sizes)

    return collate_fn


def lazy_loader(samples: Sequence[Sample], paths: Sequence[Path], model: VLM, pad_id: int,
                batches: Sequence[list[int]], workers: int = 0) -> Iterator[MicroBatch]:
    """The micro-batches `batches` in order, images read and preprocessed by `workers` processes."""
    return iter(torch.utils.data.DataLoader(LazyImages(samples, paths), batch_sampler=batches,
                                            collate_fn=pixel_collate(model, pad_id), num_workers=workers))
