"""Training: answer-only loss, AdamW, cosine schedule with warm-up, checkpoints, a JSONL log.

Shape legend: B batch, T sequence (prompt + answers, left-padded), V vocabulary,
I images, N image tokens per image, W text width.

Conversations use the LLaVA-1.5 template without a system message:
    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>
and only the answer tokens (with their </s>) are scored. The rows that predict them are
passed to the model as `loss_rows`, which FlexAttention uses as its HR rows.

Images reach the model either as pixels (everything trainable, e.g. the base model) or,
with a frozen encoder, as features computed once per image (`FeatureImages`) and shared
between methods whose `feature_key` is the same.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loupe.checkpoints import save_pretrained
from loupe.data.llava import Example
from loupe.errors import LoupeError
from loupe.files import write_json
from loupe.images import ImageProcessor, load_image
from loupe.methods import ImageFeatures, ImageInputs, RunOptions, TrainStep
from loupe.text import IMAGE_PLACEHOLDER, Tokenizer
from loupe.vlm import VLM


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up, then cosine decay to final_lr * lr
    final_lr: float = 0.1
    weight_decay: float = 0.01  # on matrices only
    grad_clip: float = 1.0
    train: tuple[str, ...] = ("decoder", "method")  # parameter name prefixes trained; the rest is frozen
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final checkpoint
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.train, str | list):
            self.train = tuple([self.train] if isinstance(self.train, str) else self.train)
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise LoupeError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0 or not 0 <= self.final_lr <= 1:
            raise LoupeError(f"lr={self.lr} must be > 0 and final_lr={self.final_lr} in [0, 1]")
        if self.warmup < 0 or self.checkpoint_every < 0:
            raise LoupeError("warmup and checkpoint_every must not be negative")

    def lr_at(self, step: int) -> float:
        """Multiplier of lr at `step` (0-based): linear warm-up, cosine to final_lr."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.final_lr + (1 - self.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- tokenised samples --------------------------------------------------------------------
@dataclass
class Sample:
    ids: list[int]  # prompt and answers, <image> expanded
    scored: list[bool]  # True at the answer tokens (and their </s>)
    image: int  # index into the image source
    example: Example | None = None

    @property
    def prompt_length(self) -> int:
        """Tokens before the first answer token."""
        return self.scored.index(True)


def conversation(ex: Example, tok: Tokenizer, tokens_per_image: int) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and which of them are scored answer tokens."""
    if tok.eos_id is None:
        raise LoupeError("the tokenizer has no </s> token to end answers with")
    ids: list[int] = [tok.bos_id] if tok.bos_id is not None else []
    scored = [False] * len(ids)
    for k, (question, answer) in enumerate(ex.turns):
        if k == 0 and not question.startswith(IMAGE_PLACEHOLDER):
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        prompt = tok.encode(f"USER: {question.strip()} ASSISTANT:", tokens_per_image, add_bos=False)
        reply = tok.encode(f" {answer.strip()}", add_bos=False) + [tok.eos_id]
        ids += prompt + reply
        scored += [False] * len(prompt) + [True] * len(reply)
    return ids, scored


def prompt_ids(ex: Example, tok: Tokenizer, tokens_per_image: int) -> list[int]:
    """The first turn's prompt, ready for generation."""
    ids, scored = conversation(Example(ex.id, ex.image, ex.turns[:1], ex.meta), tok, tokens_per_image)
    return ids[: scored.index(True)]


def tokenize(examples: Sequence[Example], tok: Tokenizer, tokens_per_image: int) -> tuple[list[Sample], list[Path]]:
    """Samples and the distinct image paths they index."""
    paths: dict[Path, int] = {}
    samples = []
    for ex in examples:
        ids, scored = conversation(ex, tok, tokens_per_image)
        samples.append(Sample(ids, scored, paths.setdefault(ex.image, len(paths)), ex))
    return samples, list(paths)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    loss_rows: torch.Tensor  # (B, T) True where the next token is scored
    targets: torch.Tensor  # (B, T) the next token (0 where not scored)
    images: list[int] = field(default_factory=list)


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
    return Batch(ids, mask, loss_rows, targets.masked_fill(~loss_rows, 0), [s.image for s in samples])


# ---- image sources --------------------------------------------------------------------------
@dataclass
class ImageBatch:
    """The images of a batch as `VLM.forward` takes them: pixels, or features already encoded."""

    pixel_values: torch.Tensor | None = None  # (I, 3, S, S)
    images: ImageInputs | None = None
    image_sizes: torch.Tensor | None = None  # (I, 2) original (height, width), with pixel_values


class ImageSource(Protocol):
    def model_inputs(self, indices: list[int]) -> ImageBatch:
        """The images `indices` for the model."""
        ...


def _load_pixels(paths: Sequence[Path], size: int, progress: bool,
                 desc: str) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Preprocessed pixels (3, S, S) of each image, and its original (height, width)."""
    processor = ImageProcessor(size=size)
    for path in tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False):
        image = load_image(path)
        yield processor(image), (image.height, image.width)


class PixelImages:
    """Preprocessed pixels of every image, kept in memory (bf16); the encoder runs each step."""

    def __init__(self, paths: Sequence[Path], size: int, progress: bool = True) -> None:
        loaded = list(_load_pixels(paths, size, progress, "images"))
        self.pixels = torch.stack([px for px, _ in loaded]).to(torch.bfloat16)  # (I, 3, S, S)
        self.sizes = torch.tensor([hw for _, hw in loaded], dtype=torch.long).view(-1, 2)  # (I, 2)

    def model_inputs(self, indices: list[int]) -> ImageBatch:
        return ImageBatch(pixel_values=self.pixels[indices].float(), image_sizes=self.sizes[indices])


FeatureStore = dict[tuple[Any, ...], ImageFeatures]


class FeatureImages:
    """Image features computed once with the (frozen) encoder, assembled per batch by the
    model's method. `store` may be shared between models of the same base: methods with
    the same `feature_key` (e.g. xattn and flexattn at 1008) reuse each other's features."""

    def __init__(self, model: VLM, paths: Sequence[Path], store: FeatureStore | None = None,
                 tag: str = "", batch_size: int = 32, progress: bool = True) -> None:
        self.model = model
        key = (*model.method.feature_key(), tag)
        store = store if store is not None else {}
        if key not in store:
            store[key] = self._encode(paths, batch_size, progress)
        self.features = store[key]

    @torch.no_grad()
    def _encode(self, paths: Sequence[Path], batch_size: int, progress: bool) -> ImageFeatures:
        size, method = self.model.method.image_size(), self.model.method
        lr: list[torch.Tensor] = []
        hr: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        pixels = _load_pixels(paths, size, progress, f"features@{size}")
        while chunk := [p for _, p in zip(range(batch_size), pixels, strict=False)]:
            px = torch.stack([p for p, _ in chunk]).to(self.model.device, self.model.dtype)
            sizes += [hw for _, hw in chunk]
            feats = method.features(self.model, px)
            lr.append(feats.lr.to(torch.bfloat16).cpu())
            if feats.hr is not None:
                hr.append(feats.hr.to(torch.bfloat16).cpu())
        return ImageFeatures(torch.cat(lr), torch.cat(hr) if hr else None,
                             torch.tensor(sizes, dtype=torch.long).view(-1, 2))

    def model_inputs(self, indices: list[int]) -> ImageBatch:
        chosen = self.features.select(indices, self.model.device, self.model.dtype)
        return ImageBatch(images=self.model.method.assemble(chosen, chosen.image_sizes))

# ---- the loop -------------------------------------------------------------------------------
def select_trainable(model: VLM, prefixes: Sequence[str]) -> list[torch.nn.Parameter]:
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown and any(not p.startswith("method") for p in unknown):
        raise LoupeError(f"no parameters start with {unknown}; top-level modules are "
                         f"{sorted({n.split('.')[0] for n in names})}")
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) for prefix in prefixes))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise LoupeError(f"nothing to train: no parameters under {list(prefixes)}")
    return chosen


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Indices of shuffled batches, epoch after epoch (the last partial batch of an epoch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    if n == 0:
        raise LoupeError("the training set is empty")
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


def loss_of(model: VLM, batch: Batch, images: ImageSource, run: RunOptions | None = None) -> torch.Tensor:
    dev = model.device
    pics = images.model_inputs(batch.images)
    out = model(batch.input_ids.to(dev), pics.pixel_values, batch.attention_mask.to(dev),
                loss_rows=batch.loss_rows.to(dev), image_sizes=pics.image_sizes, images=pics.images, run=run)
    rows = batch.loss_rows.to(dev)
    return F.cross_entropy(out.logits[rows].float(), batch.targets.to(dev)[rows])  # mean over answer tokens


def train(model: VLM, samples: Sequence[Sample], images: ImageSource, cfg: TrainConfig, pad_id: int,
          out: str | Path | None = None, progress: bool = True, desc: str = "train") -> list[dict[str, Any]]:
    """Train in place; returns the log rows (also written to `out`/train_log.jsonl with
    `out`/checkpoint-{step} folders and `out`/final, each written atomically)."""
    params = select_trainable(model, cfg.train)
    opt = _optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_at)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", asdict(cfg))
    log: list[dict[str, Any]] = []
    order = batches(len(samples), cfg.batch_size, cfg.seed)
    model.train()
    start, running, drawn = time.perf_counter(), [], Counter()
    hook_gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        idx = next(order)
        draw = model.method.on_train_step(TrainStep(step, step * len(idx) / len(samples), hook_gen))
        if draw.label is not None:
            drawn[draw.label] += 1
        loss = loss_of(model, collate([samples[i] for i in idx], pad_id), images, draw.run)
        if not torch.isfinite(loss):
            raise LoupeError(f"the loss became {loss.item()} at step {step}; nothing was saved after the last "
                             f"checkpoint - lower the learning rate (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                   "grad_norm": float(norm), "epoch": (step + 1) * len(idx) / len(samples),
                   "seconds": time.perf_counter() - start}
            if drawn:
                row["drawn"] = dict(sorted(drawn.items()))  # what the method drew per step (VISOR: configurations)
            log.append(row)
            running, drawn = [], Counter()
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if out is not None:
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
        if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_pretrained(model, out / f"checkpoint-{step + 1}", overwrite=True)
    model.eval()
    model.method.on_train_end()
    if out is not None:
        save_pretrained(model, out / "final", overwrite=True)
    return log


# ---- a training run from files (what `loupe train` calls) ------------------------------------
@dataclass
class TrainRun:
    """What `train_run` did: the log, where the model is, and the viable search (VISOR) if any."""

    log: list[dict[str, Any]]
    final: Path
    viable: dict[str, Any] | None = None


def image_source(model: VLM, paths: Sequence[Path], cfg: TrainConfig, progress: bool = True) -> ImageSource:
    """Cached features when the encoder and projector are frozen (computed once per image),
    else pixels through the encoder every step."""
    trains_encoder = any(p.startswith(("vision_tower", "projector")) for p in cfg.train)
    return PixelImages(paths, model.method.image_size(), progress) if trains_encoder else \
        FeatureImages(model, paths, progress=progress)


def train_run(model_dir: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
              cfg: TrainConfig, *, method: str | None = None, options: dict[str, Any] | None = None,
              dtype: torch.dtype | None = None, device: str = "cpu", viable_from: str | os.PathLike[str] | None = None,
              overwrite: bool = False, progress: bool = True) -> TrainRun:
    """Fine-tune the checkpoint `model_dir` (as `method` with `options`) on the LLaVA-format
    JSON `data`; the run folder `out` gets train_log.jsonl, checkpoints and final/ (with the
    tokenizer). With `viable_from` (a validation split), a VISOR model first finds its viable
    configurations there and then trains drawing one per step (`loupe.visor_train`)."""
    from loupe.checkpoints import from_pretrained
    from loupe.data.llava import read_llava

    run = Path(out)
    if (run / "final").exists() and not overwrite:
        raise LoupeError(f"{run} already holds a trained model; pass --overwrite to replace it")
    examples = read_llava(data)
    model = from_pretrained(model_dir, method, dtype=dtype or torch.float32, device=device, **(options or {}))
    tok = Tokenizer.from_folder(model_dir, model.cfg.image_token_id)
    samples, paths = tokenize(examples, tok, model.method.tokens_per_image())
    images = image_source(model, paths, cfg, progress)
    if run.exists() and overwrite:
        (run / "train_log.jsonl").unlink(missing_ok=True)
    viable = None
    if viable_from is not None:
        from loupe.visor_train import universal_setup
        val, val_paths = tokenize(read_llava(viable_from), tok, model.method.tokens_per_image())
        viable = universal_setup(model, val, image_source(model, val_paths, cfg, progress), tok, progress=progress)
        write_json(run / "viable.json", viable)
    log = train(model, samples, images, cfg, tok.pad_id, run, progress)
    (run / "final" / "tokenizer.json").write_bytes((Path(model_dir) / "tokenizer.json").read_bytes())
    return TrainRun(log, run / "final", viable)
