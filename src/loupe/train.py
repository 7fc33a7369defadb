"""Training: answer-only loss, AdamW, cosine schedule with warm-up, gradient accumulation,
bf16, activation checkpointing, DDP/FSDP2, resumable checkpoints, a JSONL log.

Shape legend: B batch, T sequence (prompt + answers, left-padded), K scored rows, V vocabulary,
I images, N image tokens per image, W text width.

Conversations go through the model's chat template (`loupe.chat`, the one generation and
evaluation use), and only the answer tokens (with the token ending each) are scored. The
rows that predict them are passed to the model as `loss_rows` (FlexAttention's HR rows)
and as `logit_rows`: the LM head runs on those K rows only. The loss of a step is the mean
over the global batch's scored tokens, whatever the process count and accumulation
(`loupe.distributed`).

Images reach the model as pixels read lazily from disk (`FromDisk`, `DataLoader` workers,
everything trainable), or held in memory (`InMemory`): pixels, or, with a frozen encoder,
features computed once per image (`FeatureImages`) and shared between methods whose
`feature_key` is the same (the reproduction's fine-tunes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loupe.checkpoints import save_pretrained
from loupe.data.batches import ImageBatch, MicroBatch, Sample, StepPlan, collate, lazy_loader, tokenize
from loupe.distributed import (
    PRECISIONS,
    World,
    accumulating,
    autocast,
    check_parallel,
    enable_activation_checkpointing,
    parallelize,
)
from loupe.errors import Interrupted, LoupeError
from loupe.files import write_json
from loupe.grounding import grounding_loss
from loupe.images import ImageProcessor, load_image
from loupe.methods import ImageFeatures, Method, RunOptions, TrainStep, Watch
from loupe.runs import (
    RunSpec,
    check_resume,
    latest,
    load_checkpoint,
    read_spec,
    save_checkpoint,
    side_files,
    write_spec,
)
from loupe.schema import check
from loupe.text import Tokenizer
from loupe.vlm import VLM


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps (see `epochs`)
    epochs: float = 0.0  # > 0: steps = epochs * samples // batch_size instead
    batch_size: int = 16  # the global batch: over every process and accumulation step
    micro_batch_size: int = 0  # samples per process per forward; 0: batch_size / processes (no accumulation)
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up, then cosine decay to final_lr * lr
    warmup_ratio: float = 0.0  # > 0: warmup = ceil(ratio * steps) instead (LLaVA's 0.03)
    final_lr: float = 0.1
    weight_decay: float = 0.01  # on matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    train: tuple[str, ...] = ("decoder", "method")  # parameter name prefixes trained; the rest is frozen
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no resumable checkpoints, only the final model
    keep_last: int = 0  # resumable checkpoints kept (0: all)
    seed: int = 0
    precision: str = "fp32"  # "bf16": bf16 compute, fp32 master weights and gradient reduction
    activation_checkpointing: bool = False  # recompute every decoder (and trained vision) layer in backward
    fused_adamw: bool = False  # torch's fused AdamW kernel (CUDA, and CPU where torch has it)
    parallel: str = "none"  # "ddp" or "fsdp" under torchrun
    group_by_length: bool = False  # batches of similar lengths (less padding)
    max_length: int = 0  # longest conversation accepted at load (0: the model's positions)
    num_workers: int = 0  # DataLoader processes reading images
    # Grounding supervision (`loupe.grounding`): weight of the loss that teaches the rows
    # predicting grounded turns' first answer tokens to attend to their boxes, at these decoder
    # layers; per grounded row, added to the per-token answer loss. 0: off (every shipped
    # recipe but the built-in benchmark's base).
    grounding: float = 0.0
    grounding_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.train, str | list):
            self.train = tuple([self.train] if isinstance(self.train, str) else self.train)
        self.grounding_layers = tuple(self.grounding_layers)
        check(self, "the training config")  # declared types; NaN and inf refused (lr=inf, grad_clip=nan)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise LoupeError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup", "checkpoint_every", "keep_last", "micro_batch_size", "max_length", "num_workers"):
            if getattr(self, name) < 0:
                raise LoupeError(f"{name}={getattr(self, name)} must not be negative")
        if not self.lr > 0 or not 0 <= self.final_lr <= 1:
            raise LoupeError(f"lr={self.lr} must be > 0 and final_lr={self.final_lr} in [0, 1]")
        if self.epochs < 0 or not 0 <= self.warmup_ratio < 1:
            raise LoupeError(f"epochs={self.epochs} must not be negative and warmup_ratio={self.warmup_ratio} "
                             "must lie in [0, 1)")
        if self.precision not in PRECISIONS:
            raise LoupeError(f"precision={self.precision!r}: choose one of {list(PRECISIONS)}")
        if self.grounding < 0 or (self.grounding > 0 and not self.grounding_layers):
            raise LoupeError(f"grounding={self.grounding} must not be negative, and needs grounding_layers "
                             f"(now {list(self.grounding_layers)})")

    def resolved(self, samples: int) -> TrainConfig:
        """Steps from `epochs` and warm-up from `warmup_ratio`, for a training set of `samples`."""
        steps = max(1, int(self.epochs * samples) // self.batch_size) if self.epochs else self.steps
        warmup = math.ceil(self.warmup_ratio * steps) if self.warmup_ratio else self.warmup
        return replace(self, steps=steps, warmup=warmup, epochs=0.0, warmup_ratio=0.0)

    def micro_size(self, world: World) -> int:
        """Samples per process per forward, checked against the global batch."""
        if self.batch_size % world.size:
            raise LoupeError(f"batch_size={self.batch_size} (the global batch) does not divide over {world.size} "
                             f"processes; choose a multiple of {world.size}")
        share = self.batch_size // world.size
        micro = self.micro_batch_size or share
        if share % micro:
            raise LoupeError(f"micro_batch_size={micro} does not divide the {share} samples each of {world.size} "
                             f"process(es) takes per step (batch_size={self.batch_size})")
        return micro

    def lr_at(self, step: int) -> float:
        """Multiplier of lr at `step` (0-based): linear warm-up, cosine to final_lr."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.final_lr + (1 - self.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- image sources --------------------------------------------------------------------------
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


# ---- what a run trains on -----------------------------------------------------------------------
class TrainData(Protocol):
    samples: Sequence[Sample]

    def loader(self, batches: list[list[int]]) -> Iterator[MicroBatch]:
        """The micro-batches of sample indices `batches`, in order, ready for the model."""
        ...


@dataclass
class InMemory:
    """Samples with an image source held in memory (pixels, or cached features)."""

    samples: Sequence[Sample]
    images: ImageSource
    pad_id: int

    def loader(self, batches: list[list[int]]) -> Iterator[MicroBatch]:
        for idx in batches:
            batch = collate([self.samples[i] for i in idx], self.pad_id)
            yield batch, self.images.model_inputs(batch.images) if batch.images else ImageBatch()


@dataclass
class FromDisk:
    """Samples whose images are read and preprocessed when a batch needs them."""

    samples: Sequence[Sample]
    paths: Sequence[Path]
    model: VLM
    pad_id: int
    workers: int = 0

    def loader(self, batches: list[list[int]]) -> Iterator[MicroBatch]:
        return lazy_loader(self.samples, self.paths, self.model, self.pad_id, batches, self.workers)


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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                             fused=True if cfg.fused_adamw else None)


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s RNG (global torch RNG and the method's draws): a pure function
    of (seed, step), so a resumed run draws what the uninterrupted one did, at any process count."""
    return (seed * 1_000_003 + step) % (2**63)


def trains_vision(cfg: TrainConfig) -> bool:
    return any(p.startswith("vision_tower") for p in cfg.train)


def loss_sum(engine: torch.nn.Module, model: VLM, batch: Any, pics: ImageBatch,
             run: RunOptions | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's scored tokens; the LM head runs on those rows only."""
    return loss_terms(engine, model, batch, pics, run)[0]


def loss_terms(engine: torch.nn.Module, model: VLM, batch: Any, pics: ImageBatch, run: RunOptions | None = None,
               grounding_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`loss_sum`, and with `grounding_layers` the grounding loss summed over the batch's
    grounded rows (None without; `loupe.grounding`)."""
    dev = model.device
    rows = batch.loss_rows.to(dev)  # (B, T)
    grounded = bool(grounding_layers) and batch.grounded_rows > 0
    watch = Watch(batch.ground_rows.to(dev), batch.ground_valid.to(dev), grounding_layers) if grounded else None
    out = engine(batch.input_ids.to(dev), pics.pixel_values, batch.attention_mask.to(dev), loss_rows=rows,
                 logit_rows=rows, image_sizes=pics.image_sizes, images=pics.images, run=run, watch=watch)
    ce = F.cross_entropy(out.logits.float(), batch.targets.to(dev)[rows], reduction="sum")  # logits (K, V)
    if not grounding_layers:
        return ce, None
    if not grounded:
        return ce, ce.new_zeros(())
    return ce, grounding_loss(out.report.watched, grounding_layers, batch.ground_boxes, batch.ground_valid)


def _touch_tower(engine: torch.nn.Module, model: VLM) -> torch.Tensor:
    """FSDP2: a micro-batch without images still runs the tower on one blank image (its
    output times 0 joins the loss), so every process takes part in the tower's all-gather
    and gradient reduce-scatter."""
    size = model.method.image_size()
    blank = torch.zeros(1, model.cfg.vision.num_channels, size, size, device=model.device, dtype=model.dtype)
    return model.vision_tower(blank, model.cfg.feature_layers).sum() * 0.0


@dataclass
class Trainer:
    """One training run's moving parts (built by `train`)."""

    model: VLM
    engine: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.LambdaLR
    cfg: TrainConfig
    world: World

    def step(self, step: int, parts: list[MicroBatch], epoch: float) -> dict[str, Any]:
        model, world, cfg = self.model, self.world, self.cfg
        torch.manual_seed(step_seed(cfg.seed, step))
        draw = model.method.on_train_step(TrainStep(step, epoch, torch.Generator().manual_seed(
            step_seed(cfg.seed + 1, step))))
        layers = cfg.grounding_layers if cfg.grounding > 0 else ()
        counts = [sum(b.scored_tokens for b, _ in parts), sum(b.grounded_rows for b, _ in parts)]
        tokens, grounded = (float(v) for v in world.sum(torch.tensor(counts, dtype=torch.float64)))  # one all-reduce
        grounded = max(1.0, grounded)
        total, ground_total, seen = 0.0, 0.0, 0
        for k, (batch, pics) in enumerate(parts):
            with accumulating(self.engine, last=k == len(parts) - 1), autocast(model, cfg.parallel, cfg.precision):
                part, ground = loss_terms(self.engine, model, batch, pics, draw.run, layers)
                if cfg.parallel == "fsdp" and pics.pixel_values is None and pics.images is None:
                    part = part + _touch_tower(self.engine, model)
                objective = part / tokens + (0.0 if ground is None else cfg.grounding * ground / grounded)
                (objective * world.size).backward()  # DDP / FSDP average over processes
            total += part.item()
            ground_total += 0.0 if ground is None else ground.item()
            seen += int(batch.attention_mask.sum())
        summed, ground_sum, seen_all = (float(v) for v in world.sum(
            torch.tensor([total, ground_total, seen], dtype=torch.float64)))
        loss = summed / tokens  # one all-reduce for the logged loss and the tokens seen
        if not math.isfinite(loss):
            raise LoupeError(f"the loss became {loss} at step {step}; nothing was saved after the last checkpoint - "
                             f"lower the learning rate (now {cfg.lr})")
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        norm_value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # the same on every rank
        if not math.isfinite(norm_value):  # before the update: the weights stay those of the last good step
            raise LoupeError(f"the gradient norm became {norm_value} at step {step} (loss {loss:.4g}); the weights "
                             f"were not updated - lower the learning rate (now {cfg.lr}) or use bf16, not fp16")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        row = {"loss": loss, "grad_norm": norm_value, "tokens": seen_all, "label": draw.label}
        return row | ({"grounding": ground_sum / grounded} if layers else {})


def build_trainer(model: VLM, cfg: TrainConfig, world: World, device: str | None = None) -> Trainer:
    """Freeze, checkpoint, wrap or shard, then the optimizer over the (sharded) trained parameters."""
    check_parallel(cfg.parallel, world)
    select_trainable(model, cfg.train)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, vision=trains_vision(cfg))
    draws = type(model.method).on_train_step is not Method.on_train_step  # VISOR: a configuration per step
    engine = parallelize(model, world, cfg.parallel, cfg.precision, varying=draws or trains_vision(cfg),
                         device=device)
    params = [p for p in model.parameters() if p.requires_grad]  # DTensors after FSDP2
    opt = _optimizer(params, cfg)
    return Trainer(model, engine, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_at), cfg, world)


def _resume_log(out: Path, step: int) -> None:
    """Keep the log rows up to `step` (a killed run may have logged past its last checkpoint)."""
    path = out / "train_log.jsonl"
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def train(model: VLM, data: TrainData, cfg: TrainConfig, out: str | Path | None = None, *, progress: bool = True,
          desc: str = "train", world: World | None = None, resume: bool = False,
          files: Sequence[Path] = (), device: str | None = None) -> list[dict[str, Any]]:
    """Train in place; returns the log rows (also written to `out`/train_log.jsonl, with
    `out`/checkpoint-N every `checkpoint_every` steps and `out`/final, each written atomically).
    With `resume`, continue from `out`'s latest checkpoint; `files` are copied into final/;
    `device`: where FSDP2 shards a model loaded on the CPU."""
    world = world or World()
    outside = [i for i in cfg.grounding_layers if not 0 <= i < model.cfg.text.num_layers]
    if cfg.grounding > 0 and outside:
        raise LoupeError(f"grounding_layers {outside}: the decoder has layers 0..{model.cfg.text.num_layers - 1}")
    trainer = build_trainer(model, cfg, world, device)
    plan = StepPlan(len(data.samples), cfg.batch_size, cfg.seed,
                    [len(s.ids) for s in data.samples] if cfg.group_by_length else None)
    micro = cfg.micro_size(world)
    out = Path(out) if out is not None else None
    start = 0
    if out is not None and world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", asdict(cfg))
    if resume and out is not None and (found := latest(out)) is not None:
        start = load_checkpoint(found[1], model, trainer.opt, trainer.sched)
        if world.main:
            _resume_log(out, start)
    stream = data.loader([b for step in range(start, cfg.steps)
                          for b in plan.rank_batches(step, world.rank, world.size, micro)])
    per_step = cfg.batch_size // world.size // micro
    log: list[dict[str, Any]] = []
    model.train()
    begin, running, grounding, drawn, tokens = time.perf_counter(), [], [], Counter(), 0.0
    bar = tqdm(range(start, cfg.steps), desc=desc, unit="step", disable=not (progress and world.main), leave=False,
               initial=start, total=cfg.steps)
    step = start
    try:
        for step in bar:
            stats = trainer.step(step, [next(stream) for _ in range(per_step)], plan.epoch_of(step))
            running.append(stats["loss"])
            grounding += [stats["grounding"]] if "grounding" in stats else []
            tokens += stats["tokens"]
            if stats["label"] is not None:
                drawn[stats["label"]] += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                seconds = time.perf_counter() - begin
                row = {"step": step + 1, "loss": sum(running) / len(running), "lr": trainer.sched.get_last_lr()[0],
                       "grad_norm": stats["grad_norm"], "epoch": plan.epoch_of(step + 1), "seconds": seconds,
                       "tokens_per_s": tokens / seconds if seconds else None}
                if grounding:
                    row["grounding"] = sum(grounding) / len(grounding)  # per grounded row (`loupe.grounding`)
                if drawn:
                    row["drawn"] = dict(sorted(drawn.items()))  # what the method drew per step (VISOR: configurations)
                log.append(row)
                running, grounding, drawn = [], [], Counter()
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if out is not None and world.main:
                    with open(out / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
            if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(out, step + 1, model, trainer.opt, trainer.sched, world, cfg.keep_last)
    except KeyboardInterrupt:
        last = latest(out) if out is not None else None
        where = f"{last[1]} is the last complete checkpoint: resume with `loupe train --resume {out}`" if last \
            else "no checkpoint was written (set checkpoint_every to make the run resumable)"
        raise Interrupted(f"interrupted at step {step} of {cfg.steps}; {where}") from None
    model.eval()
    model.method.on_train_end()
    if out is not None:
        save_final(model, cfg, world, out / "final", files)
    return log


def save_final(model: VLM, cfg: TrainConfig, world: World, path: Path, files: Sequence[Path] = ()) -> None:
    """The trained model as a Hugging Face folder (rank 0; FSDP2 gathers the full weights first)."""
    state = None
    if cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        save_pretrained(model, path, overwrite=True, state=state, files=files)
    world.barrier()


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


def _prepare_folder(run: Path, spec: RunSpec, world: World, resume: bool, overwrite: bool) -> None:
    """Check (resume) or claim (a new run) the run folder, then write run.json."""
    if resume:
        check_resume(read_spec(run), spec, run)
        if world.main:  # what a save cut short left behind
            for partial in run.glob("checkpoint-*.partial"):
                shutil.rmtree(partial, ignore_errors=True)
    elif world.main:
        earlier = [p.name for p in (run / "final", run / "run.json", run / "train_log.jsonl") if p.exists()]
        if (earlier or latest(run) is not None) and not overwrite:  # also an interrupted run's log and spec
            raise LoupeError(f"{run} already holds a training run ({', '.join(earlier) or 'checkpoints'}); pass "
                             "--resume to continue it or --overwrite to replace it")
        if run.exists():
            (run / "train_log.jsonl").unlink(missing_ok=True)
            for old in [*run.glob("checkpoint-*"), run / "final"]:
                shutil.rmtree(old, ignore_errors=True)
    if world.main:
        write_spec(run, spec)
    world.barrier()


def train_run(spec: RunSpec, out: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
              device: str = "cpu", viable_from: str | os.PathLike[str] | None = None, overwrite: bool = False,
              resume: bool = False, cache_features: bool = False, progress: bool = True) -> TrainRun:
    """Fine-tune the checkpoint `spec.model` (as `spec.method` with `spec.options`) on the
    LLaVA-format JSON `spec.data` with `spec.train`; the run folder `out` gets run.json,
    train_log.jsonl, checkpoints and final/ (with the tokenizer). Under torchrun every
    process calls this. With `viable_from` (a validation split), a VISOR model first finds
    its viable configurations there and then trains drawing one per step (`loupe.visor_train`)."""
    from loupe.checkpoints import from_pretrained
    from loupe.data.llava import read_llava

    world = World.from_env(device)
    run = Path(out)
    cfg = TrainConfig(**spec.train)
    check_parallel(cfg.parallel, world)
    examples = read_llava(spec.data, spec.image_root)
    # FSDP2 shards from the CPU copy unit by unit onto the device (no GPU holds the whole model).
    fsdp = cfg.parallel == "fsdp"
    model = from_pretrained(spec.model, spec.method, dtype=dtype or torch.float32,
                            device="cpu" if fsdp else world.device(device), **spec.options)
    tok = Tokenizer.from_folder(spec.model, model.cfg.image_token_id)
    samples, paths = tokenize(examples, tok, model, cfg.max_length or None)
    cfg = cfg.resolved(len(samples))
    cfg.micro_size(world)
    spec = replace(spec, train=asdict(cfg), world_size=world.size)
    _prepare_folder(run, spec, world, resume, overwrite)
    data: TrainData = InMemory(samples, image_source(model, paths, cfg, progress and world.main), tok.pad_id) \
        if cache_features else FromDisk(samples, paths, model, tok.pad_id, cfg.num_workers)
    viable = None
    if viable_from is not None:
        from loupe.visor_train import universal_setup
        val, val_paths = tokenize(read_llava(viable_from), tok, model)
        viable = universal_setup(model, val, image_source(model, val_paths, cfg, progress), tok, progress=progress)
        if world.main:
            write_json(run / "viable.json", viable)
    log = train(model, data, cfg, run, progress=progress, world=world, resume=resume,
                files=side_files(Path(spec.model)), device=world.device(device))
    return TrainRun(log, run / "final", viable)
