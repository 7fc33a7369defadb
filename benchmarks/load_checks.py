"""What the load-time check for non-finite weights costs, two ways: `torch.isfinite(t).all()`,
and the sum of the tensor (non-finite iff a NaN or inf is in it, barring overflow of a finite
sum), which is what `loupe.checkpoints._check_tensor` runs on each tensor as it is assigned.

Measured on `--chunk-mib` tensors of random values in each dtype (median of `--reps`), then
scaled linearly to a 7B-parameter checkpoint (LLaVA-1.5-7B: 7.06e9 parameters).

    python benchmarks/load_checks.py [--chunk-mib 512] [--reps 5] [--out benchmarks/results/load_checks.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

PARAMS_7B = 7.06e9


def timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/load_checks.json")
    args = ap.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        n = args.chunk_mib * 2**20 // torch.empty((), dtype=dtype).element_size()
        t = torch.randn(n, dtype=torch.float32).to(dtype)
        check = timed(lambda: bool(torch.isfinite(t).all()), args.reps)  # noqa: B023
        read = timed(lambda: math.isfinite(float(t.sum())), args.reps)  # noqa: B023
        rows.append({"dtype": str(dtype).removeprefix("torch."), "elements": n, "isfinite_all_s": check, "sum_s": read,
                     "isfinite_all_s_per_7b": check * PARAMS_7B / n, "sum_s_per_7b": read * PARAMS_7B / n})
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    print(f"machine: {machine}")
    print("| dtype | isfinite().all() s / 7B params | sum() (Loupe's) s / 7B params |\n|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['isfinite_all_s_per_7b']:.2f} | {r['sum_s_per_7b']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
