"""Prefill latency: Loupe against transformers' LlavaForConditionalGeneration.

Same random weights (copied through Loupe's production key map), LLaVA-1.5-7B layer
shapes cut to a few layers: decoder hidden 4096, 32 heads, FFN 11008, vocab 32064;
CLIP-L/14-336 vision layers (1024 wide, 16 heads) cut to the same count. 576 image
tokens + 64 text tokens, both models on SDPA, repetitions interleaved (L T L T ...),
medians. Goal: ratio loupe / transformers <= 1.0.

    python benchmarks/prefill_vs_transformers.py [--layers 2] [--reps 5] [--out benchmarks/results]
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
from tqdm import tqdm

import loupe
from loupe.checkpoints import hf_to_loupe

TEXT_TOKENS, IMAGE_TOKENS, IMAGE_TOKEN_ID = 64, 576, 32000


def build_pair(layers: int, dtype: torch.dtype) -> tuple[torch.nn.Module, loupe.VLM]:
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                    num_hidden_layers=layers, num_attention_heads=16,
                                                    image_size=336, patch_size=14, projection_dim=768),
        text_config=transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                             max_position_embeddings=4096),
        image_token_index=IMAGE_TOKEN_ID)
    cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    hf = transformers.LlavaForConditionalGeneration(cfg)  # on CPU: its non-persistent buffers need real init
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    hf = hf.to(dtype).eval()
    hf.set_attn_implementation("sdpa")
    ours_cfg = loupe.VLMConfig.from_hf(cfg.to_dict())
    with torch.device("meta"):
        ours = loupe.VLM(ours_cfg)
    state = {name: t for k, t in hf.state_dict().items() if (name := hf_to_loupe(k)) is not None}
    ours.load_state_dict(state, assign=True, strict=True)
    return hf, ours.eval()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 32000, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([text[:5], torch.full((IMAGE_TOKENS,), IMAGE_TOKEN_ID), text[5:]])[None]
    return ids, torch.randn(1, 3, 336, 336, generator=g)


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(dtype: torch.dtype, layers: int, reps: int) -> dict[str, object]:
    hf, ours = build_pair(layers, dtype)
    ids, px = inputs()
    px = px.to(dtype)
    runs = {"loupe": lambda: ours(ids, px), "transformers": lambda: hf(input_ids=ids, pixel_values=px)}
    with torch.inference_mode():
        diff = (runs["loupe"]().logits.float() - runs["transformers"]().logits.float()).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in tqdm(range(reps), desc=f"{str(dtype)[6:]} interleaved reps"):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"dtype": str(dtype)[6:], "median_s": med, "all_s": times, "max_abs_logit_diff": diff,
            "ratio_loupe_over_transformers": med["loupe"] / med["transformers"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    rows = [bench(getattr(torch, d), args.layers, args.reps) for d in args.dtypes]
    print(f"\nprefill, {args.layers} decoder + {args.layers} vision layers at LLaVA-1.5-7B shapes, "
          f"{IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, {torch.get_num_threads()} threads")
    print(f"{'dtype':<10}{'loupe s':>10}{'transformers s':>16}{'ratio':>8}{'max |dlogit|':>14}")
    for r in rows:
        m = r["median_s"]
        print(f"{r['dtype']:<10}{m['loupe']:>10.3f}{m['transformers']:>16.3f}"
              f"{r['ratio_loupe_over_transformers']:>8.3f}{r['max_abs_logit_diff']:>14.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "layers": args.layers,
            "reps": args.reps}
    out = args.out / "prefill_vs_transformers.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
