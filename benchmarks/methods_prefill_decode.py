"""Decoder prefill and decode latency of lowres / hd / xattn / flexattn, one run, interleaved.

LLaVA-1.5-7B decoder layer shapes (hidden 4096, 32 heads, FFN 11008, vocab 32064) cut to
`--layers` layers, random weights shared by every method. Image features are given
(random, the projector's output width), so the vision encoder is out of this comparison;
the cost model covers it. 576 LR tokens + `--text` text tokens; flexattn and xattn see
5184 HR tokens (1008 px), hd sees 576 + 1024 tokens (448 px). The FlexAttention layers
start at the same depth fraction as layer 9 of 32.

flexattn keeps a fixed budget of 10% of the HR blocks (the paper's average selection):
random weights give arbitrary attention maps, so the threshold rule would select an
arbitrary fraction and the figure would say nothing about the method.

Decode per generated token, flexattn against lowres: "repeat" = every HR token the step
selects was already projected earlier in the request (memo hit); "new" = none was, so
the step projects all of them (what the official code pays on every step).

    python benchmarks/methods_prefill_decode.py [--layers 4] [--reps 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import loupe
from loupe.methods import ImageInputs, method_options
from loupe.methods.flexattn import FlexAttention, FlexState
from loupe.methods.xattn import XAttn
from loupe.vlm import VLM

N_LR, N_HR, N_HD = 576, 5184, 1024


def build(layers: int, dtype: torch.dtype, methods: tuple[str, ...] = ("hd", "xattn", "flexattn")) -> dict[str, VLM]:
    cfg = loupe.VLMConfig(
        vision=loupe.VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4),
        text=loupe.TextConfig(hidden_size=4096, intermediate_size=11008, num_layers=layers, num_heads=32,
                              num_kv_heads=32, vocab_size=32064),
        image_token_id=32000)
    with torch.device("meta"):
        base = VLM(cfg)
    base = base.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    base = base.to(dtype).eval()
    models = {"lowres": base}
    for name in methods:
        opts = {"budget": 0.1} if name == "flexattn" else {}
        with torch.device("meta"):
            m = VLM(cfg, method_options(name, **opts))
        m.vision_tower, m.projector, m.decoder = base.vision_tower, base.projector, base.decoder
        m.method.to_empty(device="cpu").to(dtype)
        m.method.init_from_base(m)
        m.method.init_buffers()
        models[name] = m.eval()
    return models


def inputs(model: VLM, text: int, dtype: torch.dtype) -> tuple[torch.Tensor, ImageInputs]:
    g = torch.Generator().manual_seed(0)
    n = model.method.tokens_per_image()
    ids = torch.cat([torch.randint(2, 32000, (5,), generator=g), torch.full((n,), 32000),
                     torch.randint(2, 32000, (text - 5,), generator=g)])[None]
    seq = torch.randn(1, n, 4096, generator=g).to(dtype)
    hr = torch.randn(1, N_HR, 4096, generator=g).to(dtype) if isinstance(model.method, (XAttn, FlexAttention)) else None
    return ids, ImageInputs(seq, hr=hr)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_step(model: VLM, ids: torch.Tensor, images: ImageInputs, repeat: bool) -> float:
    """Prefill (untimed), then time one decode step. `repeat`: the same step was run once before
    (untimed; the cache rewound after it), so every HR token it selects is in the memo; else
    the memo is emptied first, so the step projects everything it selects anew."""
    cache = model.new_cache(1, ids.shape[1] + 2)
    model(ids, images=images, cache=cache, last_only=True)
    req, tok = cache.method_state, torch.tensor([[1234]])
    if isinstance(req, FlexState):
        if repeat:
            lengths = [layer.length for layer in cache.layers]
            segments = [(s.key_valid, s.next_position) for s in cache.segments]
            model(tok, cache=cache, last_only=True)
            for layer, n in zip(cache.layers, lengths, strict=True):
                layer.truncate(n)
            for seg, (valid, position) in zip(cache.segments, segments, strict=True):
                seg.key_valid, seg.next_position = valid, position
        else:
            req.memo.clear()
    return timed(lambda: model(tok, cache=cache, last_only=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--text", type=int, default=110)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--decode-only", action="store_true", help="only the decode steps (lowres and flexattn)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    models = build(args.layers, dtype, ("flexattn",) if args.decode_only else ("hd", "xattn", "flexattn"))
    feeds = {name: inputs(m, args.text, dtype) for name, m in models.items()}
    jobs: dict[str, Callable[[], float]] = {} if args.decode_only else {
        f"prefill/{name}": (lambda m=m, f=feeds[name]: timed(lambda: m(f[0], images=f[1], last_only=True)))
        for name, m in models.items()}
    jobs["decode/lowres"] = lambda: decode_step(models["lowres"], *feeds["lowres"], repeat=False)
    jobs["decode/flexattn-repeat"] = lambda: decode_step(models["flexattn"], *feeds["flexattn"], repeat=True)
    jobs["decode/flexattn-new"] = lambda: decode_step(models["flexattn"], *feeds["flexattn"], repeat=False)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    with torch.inference_mode():
        for job in jobs.values():  # warm-up
            job()
        for _ in tqdm(range(args.reps), desc="interleaved reps"):
            for name, job in jobs.items():
                times[name].append(job())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {} if args.decode_only else {
        "flexattn/hd prefill": med["prefill/flexattn"] / med["prefill/hd"],
        "flexattn/xattn prefill": med["prefill/flexattn"] / med["prefill/xattn"]}
    ratios |= {
        "flexattn-repeat/lowres decode": med["decode/flexattn-repeat"] / med["decode/lowres"],
        "flexattn-new/lowres decode": med["decode/flexattn-new"] / med["decode/lowres"],
    }
    print(f"\n{args.layers} decoder layers at LLaVA-1.5-7B shapes, {args.dtype}, {N_LR} LR + {args.text} text "
          f"tokens, {torch.get_num_threads()} threads, {args.reps} interleaved reps (median)")
    print(f"{'measurement':<26}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for k, v in times.items():
        print(f"{k:<26}{med[k] * 1e3:>12.1f}{min(v) * 1e3:>10.1f}{max(v) * 1e3:>10.1f}")
    for k, r in ratios.items():
        print(f"{k:<32}{r:>8.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **vars(args), "out": str(args.out)}
    path = args.out / "methods_prefill_decode.json"
    path.write_text(json.dumps({"meta": meta, "seconds": times, "median_s": med, "ratios": ratios}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
