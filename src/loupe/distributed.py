"""Training on many processes with PyTorch's own stack: DDP, or FSDP2 (`fully_shard`).

`loupe train` under `torchrun --nproc_per_node=N` reads its place from the environment
(`World.from_env`); the same code runs single-process with a world of one. The loop calls
the module `parallelize` returns and keeps the plain `VLM` for everything else (its method,
config, device).

FSDP2, as ../shared/DESIGN.md section 9 and torchtitan do it: activation checkpointing
first, then `fully_shard` per decoder block, the vision tower as one unit, the root last
(embeddings, final norm, LM head, projector, the method's own parameters); bf16 compute
with fp32 gradient reduction through `MixedPrecisionPolicy`; the optimizer built after
sharding. Methods call decoder layers through `forward_rows`, `attention_residual` and
`feed_forward` besides `forward`, and the tower through `trace`: each is registered, so
FSDP2 gathers a unit's parameters around every entry point.

Equal steps at any process count: every process takes its share of the same global batch
(`loupe.data.batches.StepPlan`), and the loss is the sum of token losses divided by the
global count of scored tokens (all-reduced), times the world size, so DDP's gradient mean
is exactly the single-process gradient of the global batch's token mean.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from loupe.errors import LoupeError
from loupe.nn.decoder import DecoderLayer
from loupe.nn.vit import VisionLayer
from loupe.vlm import VLM

PARALLEL = ("none", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")

# Decoder-layer and tower entry points besides `forward` (see the module docstring).
LAYER_METHODS = ("forward_rows", "attention_residual", "feed_forward")
TOWER_METHODS = ("trace",)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # under torchrun (a process group exists)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> World:
        """The world torchrun describes in the environment (a process group is created), or
        a single process when it is not there."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, size, local, True)

    def device(self, requested: str) -> str:
        """The device this process trains on: `cuda` becomes `cuda:LOCAL_RANK`."""
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.launched else requested

    def sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """`value` summed over the processes (float64 on the CPU: exact for counts)."""
        t = torch.as_tensor(value, dtype=torch.float64).clone()
        if self.launched and self.size > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = t.to(backend_device)
            dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's `obj` on every process."""
        if not self.launched:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def check_device(text: str) -> torch.device:
    """A device string as torch reads it, refused with a clear message where it is not a device
    or this machine lacks it (before any work: a model load, a dataset read)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise LoupeError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoupeError(f"--device {text!r}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoupeError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LoupeError(f"--device {text!r}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise LoupeError(f"--device {text!r}: Loupe runs on cpu, cuda or mps")
    return device


def check_parallel(parallel: str, world: World) -> None:
    if parallel not in PARALLEL:
        raise LoupeError(f"parallel={parallel!r}: choose one of {list(PARALLEL)}")
    if parallel != "none" and not world.launched:
        raise LoupeError(f"--parallel {parallel} needs several processes: run under torchrun, e.g. "
                         f"`torchrun --nproc_per_node=2 -m loupe train ... --parallel {parallel}`")
    if parallel == "none" and world.size > 1:
        raise LoupeError(f"{world.size} processes were launched but parallel='none': choose --parallel ddp or fsdp")


def enable_activation_checkpointing(model: VLM, vision: bool) -> None:
    """Recompute every decoder layer (and, when the tower trains, every vision layer) in backward."""
    for layer in model.decoder.layers:
        layer.checkpointed = True
    if vision:
        for layer in model.vision_tower.layers:
            layer.checkpointed = True


def parallelize(model: VLM, world: World, parallel: str, precision: str, varying: bool = False,
                device: str | None = None) -> nn.Module:
    """The module the training loop calls: `model` itself, DDP around it, or `model` sharded
    in place by FSDP2 onto `device` (default: where it is; a model loaded on the CPU is moved
    one unit at a time, so no device ever holds the whole model). `varying`: some trained
    parameters may go unused in a step (VISOR's drawn configurations, a trained tower on a
    text-only batch), which DDP must look for."""
    check_parallel(parallel, world)
    if parallel == "ddp":
        cuda = model.device.type == "cuda"
        return nn.parallel.DistributedDataParallel(model, device_ids=[model.device.index] if cuda else None,
                                                   find_unused_parameters=varying)
    if parallel == "fsdp":
        return shard(model, world, precision, torch.device(device) if device else model.device)
    return model


def shard(model: VLM, world: World, precision: str, device: torch.device) -> VLM:
    """FSDP2 over `world` on `device`: one unit per decoder layer, the vision tower as one, the
    root last. fully_shard moves each unit to the mesh's device as it shards it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        for name in LAYER_METHODS:
            register_fsdp_forward_method(layer, name)
    fully_shard(model.vision_tower, mesh=mesh, mp_policy=policy)
    for name in TOWER_METHODS:
        register_fsdp_forward_method(model.vision_tower, name)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def autocast(model: VLM, parallel: str, precision: str) -> ContextManager[object]:
    """bf16 autocast for a plain or DDP model (FSDP2 casts through its policy instead)."""
    if precision == "bf16" and parallel != "fsdp":
        return torch.autocast(model.device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def accumulating(engine: nn.Module, last: bool) -> Iterator[None]:
    """No gradient synchronisation on the micro-batches before a step's last one."""
    if last:
        yield
    elif isinstance(engine, nn.parallel.DistributedDataParallel):
        with engine.no_sync():
            yield
    elif hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


def checkpointed_layers(model: VLM) -> int:
    """How many layers recompute in backward (for logs and tests)."""
    return sum(isinstance(m, DecoderLayer | VisionLayer) and m.checkpointed for m in model.modules())
