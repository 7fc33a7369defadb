"""A training run's folder, its resumable checkpoints, and export to a Hugging Face folder.

    RUN/run.json            what the run is: base model, method and options, data, recipe
    RUN/train_log.jsonl     one row per logged step
    RUN/checkpoint-N/       the state after step N (below); only complete ones carry the name
    RUN/final/              the trained model, Hugging Face layout with its tokenizer

A checkpoint is written through `torch.distributed.checkpoint` (DCP) in its safetensors
format (`HuggingFaceStorageWriter`, every process its own shard, metadata in the files'
headers: nothing is pickled) plus `trainer.json`:
- model: every entry of the model's state dict (`model.<name>`), sharded as it trains;
- optimizer: each parameter's AdamW state tensors (`optim.<name>.<key>`), its param groups
  in trainer.json;
- scheduler, step and the data position: trainer.json (the step plan and the RNG are pure
  functions of (seed, step), `loupe.data.batches.StepPlan` and `step_seed`, so the step is
  the whole data position and every RNG state, at any process count).
DCP reads a checkpoint into whatever sharding the loading run has, so a run resumes on a
different number of processes (resharding). Processes write into `checkpoint-N.partial/`;
rank 0 renames it when every shard and trainer.json are on disk, so an interrupted or
failed save leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from loupe.distributed import World
from loupe.errors import LoupeError
from loupe.files import write_json

RUN_FILE = "run.json"
TRAINER_FILE = "trainer.json"
FORMAT = 1


@dataclass
class RunSpec:
    """What a run is. `--resume` refuses a run whose spec differs (except `MAY_CHANGE`)."""

    model: str  # the base checkpoint folder
    method: str | None  # None: the checkpoint's own
    options: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    image_root: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # the resolved `TrainConfig`
    recipe: str | None = None  # the recipe file it came from, if any
    world_size: int = 1  # when it started (a resume may differ)
    format: int = FORMAT

    # Settings a resumed run may change: they move no number of the training itself.
    MAY_CHANGE = ("log_every", "checkpoint_every", "keep_last", "num_workers", "parallel", "micro_batch_size")

    def differences(self, other: RunSpec) -> list[str]:
        """What `other` (the resuming command) changes, as 'name: saved -> now' lines."""
        found = [f"{name}: {getattr(self, name)!r} -> {getattr(other, name)!r}"
                 for name in ("model", "method", "options", "data", "image_root")
                 if getattr(self, name) != getattr(other, name)]
        keys = sorted(set(self.train) | set(other.train))
        found += [f"{k}: {self.train.get(k)!r} -> {other.train.get(k)!r}" for k in keys
                  if k not in self.MAY_CHANGE and self.train.get(k) != other.train.get(k)]
        return found


def write_spec(run: Path, spec: RunSpec) -> None:
    write_json(run / RUN_FILE, dataclasses.asdict(spec))


def read_spec(run: Path) -> RunSpec:
    path = run / RUN_FILE
    if not path.is_file():
        raise LoupeError(f"{run} is not a training run (no {RUN_FILE}); `loupe train --out` makes one")
    d = json.loads(path.read_text())
    d["train"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("train", {}).items()}
    return RunSpec(**d)


def check_resume(saved: RunSpec, now: RunSpec, run: Path) -> None:
    diff = saved.differences(now)
    if diff:
        raise LoupeError(f"--resume {run}: this command differs from the run it resumes in " + "; ".join(diff)
                         + " (start a new run with a new --out to change them)")


# ---- checkpoints --------------------------------------------------------------------------------
@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it runs single-process when no process group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The run's complete checkpoints, oldest first."""
    found = []
    for p in run.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and step.isdigit() and (p / TRAINER_FILE).is_file():
            found.append((int(step), p))
    return sorted(found)


def latest(run: Path) -> tuple[int, Path] | None:
    found = checkpoints(run)
    return found[-1] if found else None


def _flat_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to write (model and optimizer state) and the optimizer's param groups."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, opt)
    for name, state in osd["state"].items():
        for key, value in state.items():
            flat[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, osd["param_groups"]


def save_checkpoint(run: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, world: World, keep_last: int = 0,
                    extra: dict[str, Any] | None = None) -> Path:
    """RUN/checkpoint-{step}, complete or not at all; then only the newest `keep_last` are kept (0: all)."""
    final, partial = run / f"checkpoint-{step}", run / f"checkpoint-{step}.partial"
    if world.main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    world.barrier()
    try:
        flat, groups = _flat_state(model, opt)
        with _single_process_ok():
            dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True))
        if world.main:
            sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
            write_json(partial / TRAINER_FILE, {"format": FORMAT, "step": step, "world_size": world.size,
                                                "param_groups": groups, "scheduler": sched_state,
                                                "state_keys": sorted(k for k in flat if k.startswith("optim.")),
                                                **(extra or {})})
    except Exception as e:  # a full disk, a lost file system: the previous checkpoint stays the latest
        if world.main:
            shutil.rmtree(partial, ignore_errors=True)
        before = latest(run)
        kept = f"; the last complete checkpoint is {before[1]}" if before else "; no earlier checkpoint exists"
        raise LoupeError(f"could not write checkpoint {final}: {type(e).__name__}: {e}{kept}") from None
    world.barrier()
    if world.main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if keep_last:
            for _, old in checkpoints(run)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def _placeholders(model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """Empty tensors shaped (and sharded) as this run holds the optimizer state `keys`."""
    params = dict(model.named_parameters())
    out = {}
    for key in keys:
        name, _, what = key.removeprefix("optim.").rpartition(".")
        if name not in params:
            raise LoupeError(f"the checkpoint holds optimizer state for {name!r}, which this model does not train")
        out[key] = torch.zeros((), dtype=torch.float32) if what == "step" else torch.zeros_like(params[name].detach())
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load model, optimizer and scheduler in place from a checkpoint; returns its step."""
    meta = json.loads((path / TRAINER_FILE).read_text())
    model_state = get_model_state_dict(model)
    flat = {f"model.{k}": v for k, v in model_state.items()}
    flat.update(_placeholders(model, meta["state_keys"]))
    with _single_process_ok():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    set_model_state_dict(model, {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key in meta["state_keys"]:
        name, _, what = key.removeprefix("optim.").rpartition(".")
        state.setdefault(name, {})[what] = flat[key]
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(strict=True))
    sched.load_state_dict({**sched.state_dict(), **meta["scheduler"]})
    return int(meta["step"])


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    """Only the model's weights from a checkpoint (what `export` needs), at any sharding."""
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    with _single_process_ok():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    model.load_state_dict({k.removeprefix("model."): v for k, v in flat.items()})


# ---- export -----------------------------------------------------------------------------------
def export(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """RUN/checkpoint-N as a Hugging Face folder (safetensors, config.json, loupe.json, the
    tokenizer) that `loupe generate`, `loupe eval` and `from_pretrained` load."""
    from loupe.checkpoints import from_pretrained, save_pretrained

    if not (checkpoint / TRAINER_FILE).is_file():
        raise LoupeError(f"{checkpoint} is not a complete training checkpoint (no {TRAINER_FILE}); the run's "
                         f"checkpoints are {[str(p) for _, p in checkpoints(checkpoint.parent)]}")
    spec = read_spec(checkpoint.parent)
    model = from_pretrained(spec.model, spec.method, dtype=torch.float32, **spec.options)
    viable = checkpoint.parent / "viable.json"
    if viable.is_file():  # VISOR universal training: the configurations it trained
        from loupe.visor_train import visor_method
        visor_method(model).redefine(json.loads(viable.read_text())["configurations"], configuration="sample")
    load_model_state(checkpoint, model)
    save_pretrained(model, out, overwrite=overwrite, files=side_files(Path(spec.model)))
    return out


def side_files(model_dir: Path) -> list[Path]:
    """What a trained model's folder carries over from its base besides weights and config."""
    return [model_dir / name for name in ("tokenizer.json", "preprocessor_config.json") if (model_dir / name).is_file()]
