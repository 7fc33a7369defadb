"""Training throughput and peak memory per process: 1 process, and 2 under torchrun (DDP, FSDP2).

Models (random weights, shapes only):
- synth-tiny: the built-in benchmark's model (`loupe.tiny.synth_tiny_config`), everything trained;
- llava-7b-cut: LLaVA-1.5-7B's shapes (width 4096, FFN 11008, 32 heads, CLIP-L/14-336) cut to
  `--layers` decoder and `--vision-layers` vision layers, the tower frozen as FlexAttention's
  recipe has it, and the embeddings and LM head frozen to fit two processes in this VM's memory.
Each step is the real `loupe.train` step (answer-only loss over the scored rows, AdamW, clip)
on synthetic conversations: the image's tokens, `--text` prompt tokens and `--answer` scored
answer tokens. tokens/s counts every non-padding token of every process; peak memory is the
process's peak resident set (CPU) or `torch.cuda.max_memory_allocated` (GPU), per rank.
Model FLOP/s: (2 x every parameter + 4 x the trained ones) per token, the usual 6N rule
split into forward and backward and without the attention's T^2 term; with `--peak-tflops`
(the device's dense bf16 peak, e.g. 989 for an H100 SXM) also the utilisation (MFU).

    python benchmarks/train_throughput.py [--models synth-tiny,llava-7b-cut] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from loupe.bench import cut
from loupe.cost import PRESETS
from loupe.data.batches import ImageBatch, Sample
from loupe.distributed import World
from loupe.tiny import init_random_, synth_tiny_config
from loupe.train import InMemory, TrainConfig, train
from loupe.vlm import VLM

RESULTS = Path(__file__).with_name("results") / "train_throughput.json"
MODES = {"1 process": ("none", 1), "2 processes, DDP": ("ddp", 2), "2 processes, FSDP2": ("fsdp", 2)}


class RandomPixels:
    """Every image the same random picture (the encoder still runs each step)."""

    def __init__(self, size: int) -> None:
        self.pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def model_inputs(self, indices: list[int]) -> ImageBatch:
        return ImageBatch(pixel_values=self.pixels.expand(len(indices), -1, -1, -1).contiguous(),
                          image_sizes=torch.tensor([[self.pixels.shape[-1]] * 2] * len(indices)))


def model_for(name: str, layers: int, vision_layers: int) -> tuple[VLM, tuple[str, ...]]:
    torch.manual_seed(0)
    if name == "synth-tiny":
        return init_random_(VLM(synth_tiny_config(442))), ("vision_tower", "projector", "decoder")
    cfg = cut(PRESETS["llava-1.5-7b"], layers, vision_layers)
    return init_random_(VLM(cfg)), ("projector", "decoder.layers")


def samples(model: VLM, n: int, text: int, answer: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(1)
    image = [model.cfg.image_token_id] * model.method.tokens_per_image()
    out = []
    for _ in range(n):
        words = torch.randint(5, model.cfg.text.vocab_size, (text + answer,), generator=gen).tolist()
        ids = [1, *image, *words]
        out.append(Sample(ids, [False] * (len(ids) - answer) + [True] * answer, 0))
    return out


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One process of one measurement (under torchrun for 2 processes); rank 0 writes the figures."""
    world = World.from_env(args.device)
    device = torch.device(world.device(args.device))
    model, trained = model_for(args.model, args.layers, args.vision_layers)
    model.to(device)
    data = InMemory(samples(model, args.batch * (args.steps + 1), args.text, args.answer),
                    RandomPixels(model.method.image_size()), pad_id=0)
    cfg = TrainConfig(steps=args.steps + 1, batch_size=args.batch, lr=1e-4, warmup=1, train=trained, log_every=1,
                      parallel=args.parallel, precision=args.precision,
                      activation_checkpointing=args.activation_checkpointing)
    log = train(model, data, cfg, progress=False, world=world)
    timed = log[1:]  # the first step warms up (allocations, kernels)
    seconds = timed[-1]["seconds"] - log[0]["seconds"]
    total = [r["tokens_per_s"] * r["seconds"] for r in log]  # tokens since the start, at each step
    tokens = total[-1] - total[0]
    peaks = [float(x) for x in world.sum(torch.nn.functional.one_hot(torch.tensor(world.rank), world.size)
                                         * peak_gib(device))]
    if world.main:
        params = sum(p.numel() for p in model.parameters())
        trained_n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = (2 * params + 4 * trained_n) * tokens / seconds
        Path(args.result).write_text(json.dumps({"tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / 1e12,
                                                 "mfu": flops / 1e12 / args.peak_tflops if args.peak_tflops else None,
                                                 "seconds_per_step":
                                                 seconds / len(timed), "peak_gib_per_rank": peaks,
                                                 "parameters": params, "trained": trained_n}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def measure(args: argparse.Namespace, model: str, parallel: str, nproc: int, tmp: Path) -> dict[str, object]:
    result = tmp / f"{model}-{parallel}.json"
    passed = ("steps", "batch", "text", "answer", "layers", "vision_layers", "device", "precision", "peak_tflops")
    cmd = [__file__, "--worker", "--model", model, "--parallel", parallel, "--result", str(result),
           *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in passed if getattr(args, k) is not None)]
    if args.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    done = subprocess.run([*launch, *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model} {parallel} x{nproc} failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="synth-tiny,llava-7b-cut")
    p.add_argument("--steps", type=int, default=4, help="timed steps (one more warms up)")
    p.add_argument("--batch", type=int, default=4, help="global batch (2 processes: half each)")
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--layers", type=int, default=2, help="llava-7b-cut: decoder layers")
    p.add_argument("--vision-layers", type=int, default=2, help="llava-7b-cut: vision layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for mode, (parallel, nproc) in MODES.items():
                start = time.perf_counter()
                r = measure(args, model, parallel, nproc, Path(tmp))
                rows.append({"model": model, "mode": mode, **r, "wall_s": time.perf_counter() - start})
                mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
                print(f"{model:<13} {mode:<20} {r['tokens_per_s']:9.1f} tokens/s  {r['seconds_per_step']:7.2f} s/step"
                      f"  {r['model_tflops_per_s']:.3f} model TFLOP/s{mfu}"
                      f"  peak {', '.join(f'{g:.2f}' for g in r['peak_gib_per_rank'])} GiB per rank", flush=True)
    machine = {"device": args.device, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability()}
    payload = {"machine": machine, "settings": {k: v for k, v in vars(args).items()
                                                if k not in ("worker", "model", "parallel", "result", "out")},
               "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
