"""Which attention kernel each of Loupe's paths takes, on this machine's device.

Every method's prefill (a left-padded batch of two, so a mask is present) and one decode
step run under the profiler on a tiny LLaVA (LLaMA decoder, 4 query / 2 key-value heads:
grouped-query) and a tiny OneVision (Qwen2), with random weights. Reported per path: the
SDPA kernels aten dispatched to (`_scaled_dot_product_flash_attention_for_cpu`,
`_scaled_dot_product_efficient_attention`, `_scaled_dot_product_flash_attention`,
`_scaled_dot_product_cudnn_attention`, or the math fallback `_scaled_dot_product_attention_math`)
and how many explicit softmaxes ran (the score-rows seam, `row_attention`: FlexAttention's
selection, by design).

    python benchmarks/sdpa_kernels.py [--device cuda] [--out benchmarks/results/sdpa_kernels_cpu.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import profile

from loupe.bench import machine
from loupe.methods import method_options
from loupe.tiny import init_random_, tiny_config, tiny_onevision_config
from loupe.vlm import VLM

METHODS = {"llava": [("lowres", {}), ("hd", {"hr_size": 112}), ("xattn", {"hr_size": 112}),
                     ("flexattn", {"hr_size": 112}), ("visor", {"hr_size": 112}), ("fastv", {"k": 1})],
           "onevision": [("lowres", {}), ("visor", {}), ("flexattn", {})]}


def kernels(prof: profile) -> dict[str, int]:
    names = Counter(e.name for e in prof.events())
    return {n.removeprefix("aten::"): c for n, c in sorted(names.items())
            if "scaled_dot_product" in n and n != "aten::scaled_dot_product_attention" or n == "aten::_softmax"}


@torch.inference_mode()
def measure(family: str, name: str, options: dict, device: torch.device) -> dict[str, dict[str, int]]:
    torch.manual_seed(0)
    cfg = tiny_onevision_config() if family == "onevision" else tiny_config()
    try:
        model = init_random_(VLM(cfg, method_options(name, **options)), std=0.05).to(device).eval()
    except Exception as e:  # a method without this family's form
        return {"skipped": {str(e)[:80]: 0}}
    from PIL import Image
    images = model.prepare_images([Image.new("RGB", (60, 45), "red"), Image.new("RGB", (60, 45), "blue")])
    prompts = [[1, *[cfg.image_token_id] * n, 5, 6, 7][: 4 + n] for n in images.tokens]
    prompts[1] = prompts[1] + [8]  # unequal lengths: left padding, so a mask
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = model.new_cache(2, width + 2)
    with profile() as prefill:
        model(ids, images.pixel_values, mask, cache=cache, last_only=True, image_sizes=images.image_sizes)
    with profile() as decode:
        model(torch.tensor([[5], [6]]), cache=cache, last_only=True)
    return {"prefill": kernels(prefill), "decode": kernels(decode)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = {f"{family}/{name}": measure(family, name, opts, device)
            for family, methods in METHODS.items() for name, opts in methods}
    print(f"device: {device}")
    print("| path | prefill | decode |\n|---|---|---|")
    for path, r in rows.items():
        fmt = lambda d: ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"  # noqa: E731
        print(f"| {path} | {fmt(r.get('prefill', r.get('skipped', {})))} | {fmt(r.get('decode', {}))} |")
    out = Path(args.out or f"benchmarks/results/sdpa_kernels_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(device), "paths": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
