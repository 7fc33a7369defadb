"""`loupe bench`: latency of methods side by side, in one process, on the same weights.

Shape legend: B batch, T prompt length (text + image tokens), S image side in pixels.

Protocol: one random-weight model of a preset's shapes, optionally cut to a few decoder
(and encoder) layers so 7B shapes fit a laptop; every method shares its base weights
(only the method module is swapped in). After warm-up, repetitions are interleaved
(A B C A B C ...) so drift of a shared machine hits every method alike; each repetition
is a prefill from pixels (encoder, projector, decoder, first token) and `new_tokens - 1`
cached decode steps. Reported: medians with min-max, tokens/s, peak memory, and next to
every measured ratio the cost model's predicted FLOP ratio for exactly what ran (the
selection fractions measured in the run).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from loupe.config import VLMConfig
from loupe.cost import Preset, estimate, measured_selection, measured_tiles
from loupe.errors import LoupeError
from loupe.flops import Workload
from loupe.methods import Method, MethodConfig, build_method, method_label
from loupe.methods.base import LazyHR
from loupe.tiny import init_random_
from loupe.vlm import VLM


@dataclass
class BenchConfig:
    methods: list[MethodConfig]
    layers: int | None = 2  # decoder layers kept (None: all)
    vision_layers: int | None = None  # encoder layers kept (None: all)
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    batch: int = 1
    prompt_tokens: int = 64
    new_tokens: int = 8
    reps: int = 5
    warmup: int = 1
    seed: int = 0
    image_size: tuple[int, int] | None = None  # (height, width); None: the method's square input (OneVision: its
    # reference size, the largest pinpoint)

    def __post_init__(self) -> None:
        for name in ("batch", "reps", "new_tokens"):
            if getattr(self, name) < 1:
                raise LoupeError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup", "prompt_tokens"):
            if getattr(self, name) < 0:
                raise LoupeError(f"{name}={getattr(self, name)} must not be negative")
        for name in ("layers", "vision_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LoupeError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.methods:
            raise LoupeError("no methods to benchmark")


def cut(preset: Preset, layers: int | None, vision_layers: int | None) -> VLMConfig:
    """The preset's config with fewer decoder / encoder layers (the same feature layer index)."""
    d = preset.config.to_dict()
    if layers is not None:
        d["text"]["num_layers"] = layers
    if vision_layers is not None:
        d["vision"]["num_layers"] = vision_layers
        d["feature_layer"] = -1 if vision_layers == 1 else d["feature_layer"]
    return VLMConfig.from_dict(d)


# ---- measuring ------------------------------------------------------------------------
class Stopwatch:
    """Wall time of a block; on CUDA between events recorded on the stream, then synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = time.perf_counter() - self._t0


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or on CPU the
    process's resident set sampled every 2 ms from /proc after returning freed heap to the
    OS (None where there is no /proc)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = self._rss()
            if rss is not None:
                self._max = max(self._max, rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            base = self._rss()
            self._base = self._max = base or 0
            self._thread = threading.Thread(target=self._sample, daemon=True) if base is not None else None
            if self._thread:
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, self._rss() or 0) - self._base


def _release_free_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc), so that a run's resident
    growth is its own and not hidden by what the previous method left in the heap."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host while active (`.item()`,
    `bool()`, `int()`, `.tolist()`, `nonzero`, boolean-mask indexing, ...): each one waits for the
    device to finish the work queued before it, so a decode step with none can be captured or
    compiled whole. `names` lists them in order."""

    READS = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero",
                       "nonzero_static", "unique", "masked_select"})

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.READS or (name in ("__getitem__", "__setitem__") and _bool_index(args[1:2])):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(index: tuple[Any, ...]) -> bool:
    items = index[0] if index and isinstance(index[0], tuple) else index
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@dataclass
class Sample:
    prefill_s: float
    llm_prefill_s: float  # the same prefill from encoded images: the decoder (and method) part alone
    decode_s: float  # per decode step
    peak_bytes: int | None
    selected: float | None  # mean selected fraction (methods that select)
    fresh: float | None  # fraction of HR tokens a decode step projected anew
    tiles: float  # fraction of HR tiles the request encoded (1 unless encoded lazily)


@dataclass
class Request:
    """One benchmark request: prompt ids (B, T), pixels and the images' original sizes."""

    ids: torch.Tensor
    pixels: torch.Tensor  # (B, 3, S, S), or (B, P, 3, s, s) OneVision tiles
    image_sizes: torch.Tensor  # (B, 2)


@torch.inference_mode()
def run_once(model: VLM, req: Request, new_tokens: int) -> Sample:
    """One prefill from pixels and `new_tokens - 1` decode steps; then the prefill again from
    images encoded beforehand (outside the timer), which times the LLM part alone."""
    ids = req.ids
    with PeakMemory(model.device) as mem:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        with Stopwatch(model.device) as prefill:
            out = model(ids, req.pixels, cache=cache, last_only=True, image_sizes=req.image_sizes)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        fresh, last = [], out
        with Stopwatch(model.device) as decode:
            for _ in range(new_tokens - 1):
                last = model(tok, cache=cache, last_only=True)
                tok = last.logits[:, -1].argmax(-1, keepdim=True)
                fresh.append(last.report.projected_fraction)
    per_step = decode.seconds / max(1, new_tokens - 1)
    known = [f for f in fresh if f is not None]
    images = model.method.encode(model, req.pixels, req.image_sizes)
    if isinstance(images.hr, LazyHR):
        images.hr.dense()  # tiles encoded lazily: all of them now, outside the timer
    with Stopwatch(model.device) as llm:
        model(ids, images=images, cache=model.new_cache(ids.shape[0], ids.shape[1] + 1), last_only=True)
    return Sample(prefill.seconds, llm.seconds, per_step, mem.peak_bytes, measured_selection(out.report),
                  statistics.fmean(known) if known else None, measured_tiles(last.report))


def request(model: VLM, method: Method, cfg: BenchConfig, gen: torch.Generator) -> Request:
    """Random prompt ids (B, T) with the method's image block after the first token, and a random
    image of `cfg.image_size` (or the method's own input size) prepared as the model family takes it."""
    vocab, image_id = model.cfg.text.vocab_size, model.cfg.image_token_id
    text = torch.randint(5, vocab, (cfg.batch, max(1, cfg.prompt_tokens)), generator=gen)
    text = text.masked_fill(text == image_id, 5)
    h, w = cfg.image_size or reference_image_size(model.cfg, method)
    noise = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    model.method = method
    prepared = model.prepare_images([Image.fromarray(noise)] * cfg.batch)
    image = torch.full((cfg.batch, prepared.tokens[0]), image_id)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    return Request(ids.to(model.device), prepared.pixel_values.to(model.device, model.dtype),
                   prepared.image_sizes.to(model.device))


def reference_image_size(cfg: VLMConfig, method: Method) -> tuple[int, int]:
    """The image the bench uses when none is given: OneVision's largest pinpoint, else the
    method's square input."""
    if cfg.image_grid_pinpoints:
        side = max(max(p) for p in cfg.image_grid_pinpoints)
        return side, side
    return method.image_size(), method.image_size()


def benchmark(preset: Preset, cfg: BenchConfig, reference: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready results (rows in the order of cfg.methods)."""
    model_cfg = cut(preset, cfg.layers, cfg.vision_layers)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoupeError(f"device {cfg.device!r} asked for, but CUDA is not available")
    torch.manual_seed(cfg.seed)
    model = _random_model(model_cfg, cfg.dtype, device)
    methods = {method_label(o, model_cfg): _method(model, o) for o in cfg.methods}
    if len(methods) != len(cfg.methods):
        raise LoupeError(f"the same method is listed twice: {[method_label(o, model_cfg) for o in cfg.methods]}")
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = {name: request(model, m, cfg, gen) for name, m in methods.items()}
    samples: dict[str, list[Sample]] = {name: [] for name in methods}
    rounds = cfg.warmup + cfg.reps
    bar = tqdm(total=rounds * len(methods), desc="bench", disable=not progress, unit="run")
    for r in range(rounds):
        for name, method in methods.items():  # interleaved: A B C A B C ...
            model.method = method
            s = run_once(model, inputs[name], cfg.new_tokens)
            if r >= cfg.warmup:
                samples[name].append(s)
            bar.update()
    bar.close()
    rows = [_row(name, o, samples[name], model_cfg, cfg) for name, o in zip(methods, cfg.methods, strict=True)]
    ref = rows[reference]
    for row in rows:
        for phase in ("prefill", "llm_prefill", "decode"):
            row[f"{phase}_ratio_measured"] = row[f"{phase}_ms"]["median"] / ref[f"{phase}_ms"]["median"]
            row[f"{phase}_ratio_predicted"] = row[f"{phase}_flops"] / ref[f"{phase}_flops"]
    return {"config": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "methods"},
                       "dtype": str(cfg.dtype).removeprefix("torch."), "model": model_cfg.to_dict()},
            "reference": ref["method"], "machine": machine(device), "rows": rows}


def _random_model(cfg: VLMConfig, dtype: torch.dtype, device: torch.device) -> VLM:
    with torch.device("meta"):
        model = VLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    return init_random_(model).eval()  # type: ignore[return-value]


def _method(model: VLM, options: MethodConfig) -> Method:
    with torch.device("meta"):
        method = build_method(model.cfg, options)
    method = method.to_empty(device=model.device).to(model.dtype)
    init_random_(method)
    method.init_from_base(model)
    method.init_buffers()
    return method.eval()


def _stats(values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale}


def _row(name: str, options: MethodConfig, samples: list[Sample], model_cfg: VLMConfig,
         cfg: BenchConfig) -> dict[str, Any]:
    selected = [s.selected for s in samples if s.selected is not None]
    fresh = [s.fresh for s in samples if s.fresh is not None]
    workload = Workload(cfg.prompt_tokens, cfg.new_tokens, cfg.batch,
                        selected=statistics.fmean(selected) if selected else 0.1,
                        memoised=getattr(options, "memoise", True), image_size=cfg.image_size,
                        hr_tiles=statistics.fmean(s.tiles for s in samples))
    workload = dataclasses.replace(workload, fresh=min(workload.selected, statistics.fmean(fresh)) if fresh else 0.0)
    cost = estimate(model_cfg, options, workload)
    decode = [s.decode_s for s in samples]
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    return {
        "method": name, "options": cost.method,
        "prefill_ms": _stats([s.prefill_s for s in samples], 1e3),
        "llm_prefill_ms": _stats([s.llm_prefill_s for s in samples], 1e3),
        "decode_ms": _stats(decode, 1e3),
        "tokens_per_s": cfg.batch / statistics.median(decode),
        "peak_mb": statistics.median(peaks) / 2**20 if peaks else None,
        "selected_fraction": workload.selected if selected else None,
        "hr_tiles_fraction": workload.hr_tiles,
        "prefill_flops": cost.prefill, "decode_flops": cost.decode_per_token,
        "llm_prefill_flops": cost.part("prefill"),
    }


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_name()
        info["cores"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def table(results: dict[str, Any]) -> str:
    ref = results["reference"]
    lines = [f"| method | prefill ms (min-max) | LLM prefill ms | decode ms/token (min-max) | tokens/s | peak MB | "
             f"prefill / {ref} measured (FLOPs) | LLM prefill / {ref} | decode / {ref} measured (FLOPs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        p, q, d = r["prefill_ms"], r["llm_prefill_ms"], r["decode_ms"]
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"| {r['method']} | {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {q['median']:.1f} | "
                     f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | {r['tokens_per_s']:.1f} | {peak} | "
                     f"{r['prefill_ratio_measured']:.2f} ({r['prefill_ratio_predicted']:.2f}) | "
                     f"{r['llm_prefill_ratio_measured']:.2f} ({r['llm_prefill_ratio_predicted']:.2f}) | "
                     f"{r['decode_ratio_measured']:.2f} ({r['decode_ratio_predicted']:.2f}) |")
    return "\n".join(lines)
