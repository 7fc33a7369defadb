"""Per-process training memory: what `loupe train --dry-run` prints before a GPU is booked.

    parameters   fp32 master weights; FSDP2 keeps 1/N of them plus the gathered compute copies
                 of two units at a time (the one running and the one prefetched)
    gradients    fp32, trained parameters only; DDP keeps its reduction buckets beside them (2x),
                 FSDP2 reduce-scatters into 1/N
    optimizer    AdamW's two fp32 moments per trained parameter (1/N under FSDP2)
    activations  what autograd saves for backward in one micro-batch (below)

Activations of one decoder layer per token, in bytes, with W the width, F the FFN width,
G*D the key width, H the heads and c the compute dtype's bytes (counted from what each op of
`loupe.nn.decoder` saves; measured, `tests/test_train_scale.py`):
    two RMSNorms at fp32, each its input, the normalised input and the inverse RMS  4 * 2(2W + 1)
    the q/k/v input W, q W, k and v 2GD, the fused attention's output W (no T x T
    probabilities) and log-sum-exp H (fp32), the SwiGLU input W, gate, silu(gate), up and
    their product 4F                                                              c(4W + 2GD + 4F) + 4H
With activation checkpointing a layer keeps only its input (W, fp32: the residual stream)
and one layer at a time is recomputed. The LM head runs on the scored rows only (K =
answer tokens), saving its fp32 logits and their softmax. A frozen vision tower saves
nothing (its features need no gradient); a trained one is counted alike (LayerNorms 2(E + 2),
q/k/v input, q, k, v, output 5E, MLP input E, fc1 output, its activation's two 3M).
`saved_bytes` measures what autograd keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loupe.config import TextConfig, VisionConfig, VLMConfig
from loupe.errors import LoupeError
from loupe.runs import RunSpec
from loupe.train import TrainConfig

GIB = 2**30
ANSWER_TOKENS = 256  # scored tokens per sample assumed for the LM head's logits (LLaVA answers are shorter)


def decoder_layer_bytes(t: TextConfig, compute: int) -> int:
    """Saved bytes per token of one decoder layer (module docstring)."""
    w, kv, f = t.hidden_size, t.num_kv_heads * t.head_dim, t.intermediate_size
    return 4 * 2 * (2 * w + 1) + compute * (4 * w + 2 * kv + 4 * f) + 4 * t.num_heads


def vision_layer_bytes(v: VisionConfig, compute: int) -> int:
    """Saved bytes per token of one vision layer (module docstring)."""
    return compute * (2 * (v.hidden_size + 2) + 6 * v.hidden_size + 3 * v.intermediate_size) + 4 * v.num_heads


@dataclass
class MemoryEstimate:
    processes: int
    parallel: str
    parameters: float  # bytes per process
    gradients: float
    optimizer: float
    activations: float
    total_parameters: int
    trained_parameters: int
    micro_batch: int
    sequence: int

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def _meta_model(cfg: VLMConfig, spec: RunSpec) -> torch.nn.Module:
    from loupe.methods import method_options
    from loupe.vlm import VLM

    method = method_options(spec.method, **spec.options) if spec.method else None
    with torch.device("meta"):
        return VLM(cfg, method)


def _model_config(spec: RunSpec) -> VLMConfig:
    """The recipe's model: a checkpoint folder, or the name of a `loupe.cost` preset (shapes only)."""
    from loupe.checkpoints import read_config
    from loupe.cost import PRESETS

    folder = Path(spec.model)
    if folder.is_dir():
        return read_config(folder)[0]
    if folder.name in PRESETS:
        return PRESETS[folder.name].config
    raise LoupeError(f"model {spec.model!r} is neither a checkpoint folder nor a preset ({sorted(PRESETS)}); "
                     "--dry-run needs one of them")


def estimate(cfg: VLMConfig, spec: RunSpec, train: TrainConfig, processes: int, sequence: int) -> MemoryEstimate:
    """Bytes per process of training `spec` with `train` on `processes` devices, sequences of `sequence`."""
    model = _meta_model(cfg, spec)
    names = [(n, p.numel()) for n, p in model.named_parameters()]
    trained = sum(n for name, n in names if any(name.startswith(p) for p in train.train))
    total = sum(n for _, n in names)
    fsdp = train.parallel == "fsdp"
    shard = processes if fsdp else 1
    compute = 2 if train.precision == "bf16" else 4
    params = 4 * total / shard
    if fsdp:
        units = [sum(p.numel() for p in layer.parameters()) for layer in model.decoder.layers]
        units.append(sum(p.numel() for p in model.vision_tower.parameters()))
        params += 2 * max(units) * compute  # two gathered units in flight
    grads = 4 * trained / shard * (2 if train.parallel == "ddp" else 1)
    micro = train.micro_batch_size or max(1, train.batch_size // processes)
    return MemoryEstimate(processes, train.parallel, params, grads, 8 * trained / shard,
                          activation_bytes(cfg, train, micro, sequence), total, trained, micro, sequence)


def activation_bytes(cfg: VLMConfig, train: TrainConfig, micro: int, sequence: int,
                     answer_tokens: int = ANSWER_TOKENS) -> float:
    """Saved activations of one micro-batch of `micro` sequences of `sequence` tokens."""
    t, v = cfg.text, cfg.vision
    compute = 2 if train.precision == "bf16" else 4
    tokens = micro * sequence
    layer = decoder_layer_bytes(t, compute) * tokens
    if train.activation_checkpointing:
        decoder = t.num_layers * t.hidden_size * tokens * 4 + layer
    else:
        decoder = t.num_layers * layer
    head = 2 * 4 * micro * min(sequence, answer_tokens) * t.vocab_size  # fp32 logits and their softmax
    vision = 0.0
    if any(p.startswith("vision_tower") for p in train.train):
        patches = (v.grid**2 + 1) * micro
        vlayer = vision_layer_bytes(v, compute) * patches
        vision = (v.num_layers * v.hidden_size * patches * 4 + vlayer) if train.activation_checkpointing \
            else v.num_layers * vlayer
    return decoder + head + vision


def estimate_run(spec: RunSpec, train: TrainConfig, processes: int | None = None) -> MemoryEstimate:
    """`loupe train --dry-run`: the recipe's model on `processes` (default: the launched world)."""
    import os

    n = processes or int(os.environ.get("WORLD_SIZE", 1))
    if n < 1:
        raise LoupeError(f"--nproc {n} must be at least 1")
    cfg = _model_config(spec)
    sequence = train.max_length or cfg.text.max_position_embeddings
    return estimate(cfg, spec, train, n, sequence)


def memory_table(e: MemoryEstimate) -> str:
    rows = [("parameters", e.parameters), ("gradients", e.gradients), ("optimizer (AdamW)", e.optimizer),
            ("activations", e.activations), ("total", e.total)]
    head = (f"per process, {e.processes} process(es), parallel={e.parallel}: {e.total_parameters / 1e9:.3f}B "
            f"parameters ({e.trained_parameters / 1e9:.3f}B trained), micro-batch {e.micro_batch} x "
            f"{e.sequence} tokens")
    return "\n".join([head, *(f"  {name:<18} {value / GIB:9.2f} GiB" for name, value in rows)])


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while `fn` runs (each storage counted once), leaving
    out the storages of `exclude` (a module's parameters: weights are not activations)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
