"""Decode throughput: Loupe's generate (eager, static-shape and compiled decode steps) against
transformers' `LlavaForConditionalGeneration.generate` on the same random weights.

LLaVA-1.5-7B layer shapes cut to a few layers (see `prefill_vs_transformers.py`), 576 image +
64 text tokens per prompt, greedy, a fixed number of new tokens (no early stop). Decode
tokens/s = batch x (new tokens - 1) / (time of the last token - time of the first), both
timestamped by each library's own streaming hook (Loupe's `on_token`, a transformers
`BaseStreamer`), so the prefill is outside it. Repetitions interleaved, the first of each
discarded (it compiles), medians. Goal (issue #18): compiled >= 1.2x transformers at batch 1 and 8.

    python benchmarks/decode_vs_transformers.py [--layers 4] [--batches 1 8] [--new-tokens 33] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from prefill_vs_transformers import IMAGE_TOKEN_ID, IMAGE_TOKENS, TEXT_TOKENS, build_pair
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from loupe.generation import SamplingConfig, generate


class Clock(BaseStreamer):
    """Timestamps of each new token (transformers puts the prompt first: skipped)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def __call__(self, tokens: torch.Tensor) -> None:  # Loupe's on_token
        self.stamps.append(time.perf_counter())

    def tokens_per_s(self, batch: int) -> float:
        return batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def prompts(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 32000, (batch, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :5], torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN_ID), text[:, 5:]], dim=1)
    return ids, torch.randn(batch, 3, 336, 336, generator=g)


def bench(hf: torch.nn.Module, ours: torch.nn.Module, batch: int, new: int, reps: int,
          dtype: torch.dtype) -> dict[str, object]:
    ids, px = prompts(batch)
    px = px.to(dtype)
    outputs: dict[str, torch.Tensor] = {}

    def loupe_run(mode: str) -> Clock:
        clock = Clock()
        outputs[mode] = generate(ours, ids, px, sampling=SamplingConfig(max_new_tokens=new), on_token=clock,
                                 decode=mode)
        return clock

    def hf_run() -> Clock:
        clock = Clock()
        out = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          streamer=clock, pad_token_id=0)
        outputs["transformers"] = out[:, ids.shape[1]:]
        return clock

    runs = {"transformers": hf_run, **{f"loupe {m}": (lambda m=m: loupe_run(m)) for m in ("eager", "static",
                                                                                          "compiled")}}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for r in tqdm(range(reps + 1), desc=f"batch {batch} interleaved reps"):
            for name, fn in runs.items():
                rate = fn().tokens_per_s(batch)
                if r:  # the first round warms up (and compiles)
                    rates[name].append(rate)
    med = {name: statistics.median(v) for name, v in rates.items()}
    agree = {m: float((outputs[m] == outputs["transformers"]).float().mean()) for m in ("eager", "static", "compiled")}
    return {"batch": batch, "new_tokens": new, "tokens_per_s": med, "all_tokens_per_s": rates,
            "speedup_over_transformers": {n: med[n] / med["transformers"] for n in med},
            "token_agreement_with_transformers": agree,
            "compiled_equals_eager": bool(torch.equal(outputs["compiled"], outputs["eager"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    hf, ours = build_pair(args.layers, dtype)
    rows = [bench(hf, ours, b, args.new_tokens, args.reps, dtype) for b in args.batches]
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"\ndecode, {args.layers} decoder layers at LLaVA-1.5-7B shapes, {args.dtype}, {IMAGE_TOKENS} image + "
          f"{TEXT_TOKENS} text tokens, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, CPU {cpu}; "
          "tokens/s (x transformers)")
    names = list(rows[0]["tokens_per_s"])
    print(f"{'batch':<7}" + "".join(f"{n:>22}" for n in names) + f"{'compiled = eager':>18}")
    for r in rows:
        cells = "".join(f"{r['tokens_per_s'][n]:>13.2f} ({r['speedup_over_transformers'][n]:.2f}x)" for n in names)
        print(f"{r['batch']:<7}{cells}{str(r['compiled_equals_eager']):>18}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpu_capability": cpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "layers": args.layers, "reps": args.reps, "dtype": args.dtype}
    out = args.out / f"decode_vs_transformers_{args.dtype}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
