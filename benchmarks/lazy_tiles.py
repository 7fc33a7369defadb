"""How many HR tiles a FlexAttention request encodes with `lazy_hr`, measured, and what that
does to the whole model's cost.

The measured selection: the built-in benchmark's scenes (`loupe.data.synthetic`, seed 0) and
questions, asked of the shipped synth-base as FlexAttention at its defaults (threshold rule,
HR 3x native = 3 x 3 tiles; W'_K, W'_V copied from the base, so the selection is the base's
own attention - no FlexAttention training). Per request (prefill and `--new-tokens - 1`
decode steps): the fraction of tiles encoded and the selected fraction. Then `loupe.cost` at
LLaVA-1.5-7B, 1008 px, with those fractions against lowres, and the prefill wall time of the
synth model lazy against encoding every tile (interleaved, medians).

    python benchmarks/lazy_tiles.py [--scenes 24] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import loupe
from loupe.cost import PRESETS, estimate, measured_selection, measured_tiles
from loupe.data.synthetic import SynthConfig, make_scene, render, scene_questions
from loupe.flops import Workload
from loupe.generation import SamplingConfig, answer
from loupe.methods import MethodReport, method_options
from loupe.reproduce import SHIPPED_BASE
from loupe.text import Tokenizer


def requests(scenes: int, folder: Path) -> list[tuple[Path, str]]:
    rng, cfg = random.Random(0), SynthConfig()
    out = []
    for i in range(scenes):
        scene = make_scene(rng, cfg)
        path = folder / f"{i}.png"
        render(scene, cfg).save(path)
        out.append((path, rng.choice(scene_questions(rng, scene))["question"]))
    return out


def measure(model: loupe.VLM, tok: Tokenizer, asks: list[tuple[Path, str]], new_tokens: int) -> list[dict[str, float]]:
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=[])
    rows = []
    for path, question in tqdm(asks, desc="requests"):
        reports: list[MethodReport] = []
        answer(model, tok, path, question, sampling, on_report=reports.append)
        rows.append({"tiles": measured_tiles(reports[-1]), "tiles_at_prefill": measured_tiles(reports[0]),
                     "selected": measured_selection(reports[0]) or 0.0})
    return rows


def prefill_seconds(models: dict[str, loupe.VLM], asks: list[tuple[Path, str]], reps: int) -> dict[str, list[float]]:
    from PIL import Image
    times: dict[str, list[float]] = {name: [] for name in models}
    some = asks[:reps]
    for path, _ in some:  # interleaved: lazy, every, lazy, every, ...
        image = Image.open(path)
        for name, model in models.items():
            prepared = model.prepare_images([image])
            ids = torch.full((1, prepared.tokens[0] + 8), model.cfg.image_token_id)
            ids[0, -8:] = 5
            with torch.inference_mode():
                start = time.perf_counter()
                model(ids, prepared.pixel_values, image_sizes=prepared.image_sizes, last_only=True)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lazy = loupe.from_pretrained(SHIPPED_BASE, "flexattn", dtype=torch.float32, lazy_hr=True)
    every = loupe.from_pretrained(SHIPPED_BASE, "flexattn", dtype=torch.float32, lazy_hr=False)
    tok = Tokenizer.from_folder(SHIPPED_BASE, lazy.cfg.image_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        asks = requests(args.scenes, Path(tmp))
        rows = measure(lazy, tok, asks, args.new_tokens)
        times = prefill_seconds({"lazy": lazy, "every": every}, asks, reps=min(len(asks), 12))
    tiles = [r["tiles"] for r in rows]
    at_prefill = [r["tiles_at_prefill"] for r in rows]
    selected = statistics.fmean(r["selected"] for r in rows)
    cfg = PRESETS["llava-1.5-7b"].config
    work = Workload(prompt_tokens=64, new_tokens=args.new_tokens, selected=max(selected, 1e-3))
    low = estimate(cfg, method_options("lowres"), work).total
    flex = method_options("flexattn", hr_size=1008)
    cost = {name: estimate(cfg, flex, dataclasses.replace(work, hr_tiles=t)).total / low
            for name, t in (("every tile", 1.0), ("lazy, measured mean", statistics.fmean(tiles)),
                            ("lazy, prefill's mean", statistics.fmean(at_prefill)),
                            ("lazy, measured max", max(tiles)))}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{len(rows)} requests, {args.new_tokens} tokens each: tiles encoded per request (of 9) "
          f"mean {9 * statistics.fmean(tiles):.2f}, min {9 * min(tiles):.0f}, max {9 * max(tiles):.0f} "
          f"(by the end of prefill: mean {9 * statistics.fmean(at_prefill):.2f}, min {9 * min(at_prefill):.0f}); "
          f"selected fraction {selected:.3f}")
    print("LLaVA-1.5-7B, FlexAttention at 1008 px, whole request / lowres (loupe.cost, FLOPs):")
    for name, ratio in cost.items():
        print(f"  {name:<22}{ratio:.3f}")
    print(f"synth prefill (median of {len(times['lazy'])}): lazy {med['lazy'] * 1e3:.1f} ms, every tile "
          f"{med['every'] * 1e3:.1f} ms ({med['lazy'] / med['every']:.2f}x)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lazy_tiles.json"
    meta = {"machine": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "scenes": args.scenes, "new_tokens": args.new_tokens}
    path.write_text(json.dumps({"meta": meta, "requests": rows, "flops_over_lowres": cost,
                                "prefill_s": times, "prefill_median_s": med}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
