"""The cost model: analytic FLOPs of any method on any model shape, part by part.

    cost = loupe.cost.estimate(PRESETS["llava-1.5-7b"].config, method_options("flexattn"),
                               Workload(prompt_tokens=64, new_tokens=16, selected=0.1))
    cost.total, cost.parts["vision.hr"], cost.decode_per_token

Parts (FLOPs for the whole batch; `loupe.flops` says what is counted):
    vision.lr / vision.hr   encoder passes (LR image; HR image or its tiles)
    projector               the 2-layer MLP over every feature row
    prefill.llm             decoder layers over the prompt (text + image tokens in the sequence)
    prefill.lm_head         logits of the last prompt position (or all, `lm_head="all"`)
    prefill.<extra>         what the method adds (FlexAttention HR keys, XAttn cross-attention)
    decode.llm / decode.lm_head / decode.<extra>   the new_tokens - 1 decode steps

Conventions:
    flops       (default) the parts above
    image-macs  the token-pruning papers' count (PyramidDrop, SparseVLM): multiply-accumulates
                of the LLM over the image tokens only, 4nd^2 + 2n^2d + 3ndm per layer (d width,
                m MLP width, n image tokens in the sequence; LLaVA-1.5-7B at 576 tokens:
                3.82e12), plus half the FLOPs of the method's image-driven extras.
    fastv-macs  FastV's formula: 4nd^2 + 2n^2d + 2ndm per layer with n the whole prompt (text
                and image tokens; only image tokens are pruned) and a 2-matrix MLP term
                (LLaMA's SwiGLU has 3). Neither counts the vision encoder or GQA.
Every cost also carries `equivalent_image_tokens`: the n at which plain image tokens in
every layer would cost the method's image-macs, which puts layer-wise methods
(FlexAttention, XAttn, VISOR, pruning) on the token-count axis of the papers.

Every formula is checked against torch's FlopCounterMode on real forwards (tests/test_cost.py);
`count_flops` is that counter, with the CPU SDPA kernel it misses by default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from loupe.config import SIGLIP_MEAN, SIGLIP_STD, TextConfig, VisionConfig, VLMConfig, default_pinpoints
from loupe.errors import LoupeError
from loupe.flops import CostPlan, Workload, decoder_layer, image_token_macs, lm_head, projector, vision_pass
from loupe.methods import MethodConfig, MethodReport, method_label, parse_method
from loupe.methods.base import check_shared_options, model_method_class
from loupe.tiny import synth_tiny_config, tiny_config, tiny_onevision_config

# The token-reduction papers' MAC conventions: PyramidDrop's and SparseVLM's counts the image
# tokens alone with a 3ndm SwiGLU term ("image-macs"); FastV's formula counts every prompt
# token (n is the sequence length; only image tokens are pruned) with 2ndm ("fastv-macs").
# (feed-forward matrices, text rows counted too) per convention.
MAC_CONVENTIONS = {"image-macs": (3, False), "fastv-macs": (2, True)}
CONVENTIONS = ("flops", *MAC_CONVENTIONS)


@dataclass(frozen=True)
class Preset:
    """Real model shapes."""

    config: VLMConfig
    description: str

    @property
    def class_token(self) -> bool:
        return self.config.vision.class_token


def _llava15(width: int, mlp: int, layers: int, heads: int) -> VLMConfig:
    return VLMConfig(text=TextConfig(hidden_size=width, intermediate_size=mlp, num_layers=layers, num_heads=heads,
                                     num_kv_heads=heads))  # vision: the VisionConfig defaults, CLIP ViT-L/14-336


def onevision_05b() -> VLMConfig:
    """The published LLaVA-OneVision-0.5B config, as `VLMConfig.from_hf` reads it (vocabulary
    152,000: Qwen2's 151,936 plus <image> and <video>, padded to a multiple of 64 by the
    conversion script)."""
    return VLMConfig(
        vision=VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, image_size=384,
                            patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", class_token=False),
        text=TextConfig(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                        num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                        qkv_bias=True, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                        pad_token_id=None),
        image_token_id=151646, feature_layer=-1, feature_strategy="full", vision_tower="siglip",
        image_packing="anyres", chat_template="chatml", image_grid_pinpoints=default_pinpoints(384),
        image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(_llava15(4096, 11008, 32, 32), "CLIP ViT-L/14-336 (layer -2) + Vicuna-7B"),
    "llava-1.5-13b": Preset(_llava15(5120, 13824, 40, 40), "CLIP ViT-L/14-336 (layer -2) + Vicuna-13B"),
    "llava-ov-0.5b": Preset(
        onevision_05b(),
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m/14-384 cut to 26 layers (a 384 px tile gives "
        "27 x 27 = 729 patches) + Qwen2-0.5B, AnyRes over 36 pinpoints with anyres_max_9; the default image "
        "(2304 x 2304, `--image-size`) takes 729 + 81 x 82 = 7,371 tokens"),
    "tiny": Preset(tiny_config(), "the tiny random model of `loupe demo` and the tests"),
    "tiny-ov": Preset(tiny_onevision_config(), "a tiny random LLaVA-OneVision (SigLIP tiles of 42 px, Qwen2), the "
                      "tests' OneVision"),
    "synth-tiny": Preset(synth_tiny_config(), "the model `loupe reproduce` trains: 4-layer ViT (64 px, 8 px "
                         "patches) + 4-layer decoder of width 128 (vocabulary: the benchmark's BPE, up to 512)"),
}


@dataclass
class Cost:
    method: dict[str, Any]  # the method's options, with its name
    convention: str
    workload: dict[str, Any]
    parts: dict[str, float]
    decode_per_token: float  # mean FLOPs of one decode step (of the first one if there is none)
    image_tokens: int  # image tokens per sample in the decoder sequence
    equivalent_image_tokens: float
    label: str = ""  # `loupe.methods.method_label`: the method and what tells this run apart

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def part(self, prefix: str) -> float:
        """Sum of the parts whose name starts with `prefix` (e.g. "vision", "prefill")."""
        return sum(v for k, v in self.parts.items() if k == prefix or k.startswith(prefix + "."))

    @property
    def prefill(self) -> float:
        """Everything before the first new token: encoder, projector, prefill (image-macs
        counts the prefill only, so there it is the total)."""
        if self.convention in MAC_CONVENTIONS:
            return self.total
        return self.part("vision") + self.part("projector") + self.part("prefill")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "convention": self.convention, "workload": self.workload,
                "total": self.total, "prefill": self.prefill, "decode_per_token": self.decode_per_token,
                "parts": self.parts, "image_tokens": self.image_tokens,
                "equivalent_image_tokens": self.equivalent_image_tokens}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LoupeError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def estimate(cfg: VLMConfig, options: MethodConfig, workload: Workload | None = None, *,
             convention: str = "flops", class_token: bool | None = None) -> Cost:
    """The cost of `workload` on model `cfg` under method `options` (`class_token` None: the
    vision config's)."""
    if convention not in CONVENTIONS:
        raise LoupeError(f"unknown convention {convention!r}; choose one of {list(CONVENTIONS)}")
    w = workload or Workload()
    method_cls = model_method_class(cfg, options.name)
    method_cls.validate_options(cfg, options)
    plan = method_cls.cost_plan(cfg, options, w)
    class_token = cfg.vision.class_token if class_token is None else class_token
    t = cfg.text
    seq = w.prompt_tokens + plan.image_tokens  # prompt length P
    image_layers = t.num_layers if plan.image_layers is None else plan.image_layers
    schedule = plan.image_schedule or ((image_layers, plan.image_tokens),)
    image_extras = {k: v / 2 for k, v in plan.prefill_extra(seq).items() if k in plan.image_parts}
    image_macs = _schedule_macs(t, schedule) + sum(image_extras.values())  # Loupe's token axis: image-macs
    if convention in MAC_CONVENTIONS:
        ffn, with_text = MAC_CONVENTIONS[convention]
        text = w.prompt_tokens if with_text else 0
        parts = {"prompt_tokens" if with_text else "image_tokens": _schedule_macs(t, schedule, ffn, text),
                 **image_extras}
        per_token = 0.0
    else:
        prefill_llm = plan.prefill_llm or (lambda n: t.num_layers * decoder_layer(t, n, n))
        step = _step_cost(t, plan)
        parts = {name: passes * vision_pass(cfg, side, class_token) for name, (side, passes) in plan.vision.items()}
        parts["projector"] = projector(cfg, plan.projector_rows)
        parts["prefill.llm"] = prefill_llm(seq)
        parts["prefill.lm_head"] = lm_head(t, seq if w.lm_head == "all" else 1)
        parts.update({f"prefill.{k}": v for k, v in plan.prefill_extra(seq).items()})
        decode = _decode(step, seq, max(0, w.new_tokens - 1))
        per_token = sum(step(seq + 1).values()) if w.new_tokens <= 1 else sum(decode.values()) / (w.new_tokens - 1)
        parts.update(decode)
    method = options.to_dict()
    hr = method_cls.hr_label(cfg, options)
    if hr is not None:
        method["hr_size"] = hr
    return Cost(method, convention, w.to_dict(), {k: w.batch * v for k, v in parts.items()},
                w.batch * per_token, plan.image_tokens, _equivalent_tokens(t, image_macs), method_label(options, cfg))


def _step_cost(t: TextConfig, plan: CostPlan) -> Callable[[int], dict[str, float]]:
    """Tk (keys incl. the new one) -> the parts of one decode step."""
    llm = plan.decode_llm or (lambda keys: t.num_layers * decoder_layer(t, 1, keys))
    return lambda keys: {"llm": llm(keys), "lm_head": lm_head(t, 1), **plan.decode_extra(keys)}


def _decode(step: Callable[[int], dict[str, float]], seq: int, steps: int) -> dict[str, float]:
    """Parts of `steps` decode steps after a prompt of `seq` tokens (step j sees seq + j keys)."""
    parts: dict[str, float] = {}
    for k in range(seq + 1, seq + steps + 1):
        for name, v in step(k).items():
            parts[f"decode.{name}"] = parts.get(f"decode.{name}", 0.0) + v
    return parts


def _schedule_macs(t: TextConfig, schedule: tuple[tuple[float, float], ...], ffn: int = 3, text: int = 0) -> float:
    """MACs of (layers, image tokens) pieces, each layer also holding `text` rows; the layers
    no piece covers hold the text alone."""
    rest = max(0.0, t.num_layers - sum(layers for layers, _ in schedule))
    return sum(layers * image_token_macs(t, n + text, ffn) for layers, n in (*schedule, (rest, 0)))


def _equivalent_tokens(t: TextConfig, macs: float) -> float:
    """n with num_layers * (4nd^2 + 2n^2d + 3ndm) = macs (the positive root)."""
    d, m = t.hidden_size, t.intermediate_size
    a, b, c = 2 * d, 4 * d * d + 3 * d * m, -macs / t.num_layers
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def measured_selection(report: MethodReport) -> float | None:
    """A run's selected fraction for `Workload.selected`: the mean over layers and samples of
    the per-layer selection fractions a method reported (`VLMOutput.report`; None if it selects nothing)."""
    fractions = report.selected_fraction
    if not fractions:
        return None
    return float(torch.stack([f.float().mean() for f in fractions.values()]).mean())


def measured_tiles(report: MethodReport) -> float:
    """A run's fraction of HR tiles encoded, for `Workload.hr_tiles` (1: the method encodes every
    tile, or reports none); pass the report of the request's last call (the count accumulates)."""
    return 1.0 if not report.tiles_encoded else min(1.0, report.tiles_encoded)


# ---- the real count -------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs torch's FlopCounterMode counts while `fn` runs, including the
    CPU flash-attention kernel SDPA dispatches to (counted as 0 without this mapping)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- presentation ---------------------------------------------------------------------
def format_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f}"


def parts_table(cost: Cost) -> str:
    """One method's parts, largest first, with their share of the total."""
    unit = "MACs" if cost.convention in MAC_CONVENTIONS else "FLOPs"
    lines = [f"| part | {unit} | share |", "|---|---|---|"]
    total = cost.total or 1.0
    for name, v in sorted(cost.parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {format_flops(v)} | {100 * v / total:.1f}% |")
    lines.append(f"| **total** | **{format_flops(cost.total)}** | 100% |")
    return "\n".join(lines)


def compare_table(costs: list[Cost]) -> str:
    """Methods side by side, ratios to the first."""
    ref = costs[0]
    lines = ["| method | image tokens | equiv. image tokens | prefill | decode / token | total | total / "
             f"{ref.method['name']} |", "|---|---|---|---|---|---|---|"]
    for c in costs:
        decode = "-" if c.convention in MAC_CONVENTIONS else format_flops(c.decode_per_token)
        lines.append(f"| {_label(c)} | {c.image_tokens} | {c.equivalent_image_tokens:.0f} | "
                     f"{format_flops(c.prefill)} | {decode} | {format_flops(c.total)} | "
                     f"{c.total / ref.total:.3f} |")
    return "\n".join(lines)


def budgets(cfg: VLMConfig, options: MethodConfig, workload: Workload | None = None, *,
            class_token: bool | None = None) -> dict[str, Any]:
    """Every compute budget of one trained model (VISOR: one per configuration) against the
    method's dense reference (the same model with all image tokens in every layer).
    "LLM prefill" is every prefill part after the projector: decoder layers, LM head and the
    method's extras (VISOR's CA layers and router)."""
    cls = model_method_class(cfg, options.name)
    dense = cls.dense_reference(cfg, options)
    ref = estimate(cfg, dense, workload, class_token=class_token) if dense is not None else None
    rows = []
    for budget in cls.budgets(cfg, options):
        c = estimate(cfg, budget, workload, class_token=class_token)
        row = {"budget": budget.variant(cfg), "options": c.method, "llm_prefill": c.part("prefill"),
               "prefill": c.prefill, "equivalent_image_tokens": c.equivalent_image_tokens}
        if ref is not None:
            row["llm_saving"] = ref.part("prefill") / row["llm_prefill"]
            row["prefill_saving"] = ref.prefill / row["prefill"]
        rows.append(row)
    return {"reference": ref.to_dict() if ref else None, "budgets": rows}


def budget_table(report: dict[str, Any]) -> str:
    ref = report["reference"]
    name = _label_of(ref["method"]) if ref else "-"
    lines = [f"| budget | LLM prefill | saving vs {name} | prefill (all) | saving | equiv. image tokens |",
             "|---|---|---|---|---|---|"]
    if ref:
        lines.append(f"| {name} (every layer) | {format_flops(_prefill_parts(ref))} | 1.0x | "
                     f"{format_flops(ref['prefill'])} | 1.0x | {ref['equivalent_image_tokens']:.0f} |")
    for r in report["budgets"]:
        lines.append(f"| {r['budget']} | {format_flops(r['llm_prefill'])} | {r.get('llm_saving', 0):.1f}x | "
                     f"{format_flops(r['prefill'])} | {r.get('prefill_saving', 0):.1f}x | "
                     f"{r['equivalent_image_tokens']:.0f} |")
    return "\n".join(lines)


def _prefill_parts(cost: dict[str, Any]) -> float:
    """A cost's LLM prefill (its prefill.* parts), from its dict form."""
    return sum(v for k, v in cost["parts"].items() if k.startswith("prefill."))


def _label_of(method: dict[str, Any]) -> str:
    hr = method.get("hr_size")
    return method["name"] + (f"@{hr}" if hr else "")


def _label(c: Cost) -> str:
    return c.label or _label_of(c.method)


# ---- `loupe flops` ------------------------------------------------------------------------
@dataclass
class FlopsReport:
    """The analytic cost of one or more methods on one model's shapes (`loupe flops`)."""

    source: str  # the preset's name or the checkpoint folder
    shapes: Preset
    workload: Workload
    convention: str
    costs: list[Cost]
    budget_report: dict[str, Any] | None  # every budget of a multi-budget method (VISOR), vs its dense reference

    def to_json(self) -> dict[str, Any]:
        body = self.costs[0].to_dict() if len(self.costs) == 1 else {
            "methods": [c.to_dict() for c in self.costs], "ratios": [c.total / self.costs[0].total for c in self.costs]}
        if self.budget_report is not None:
            body["budgets"] = self.budget_report
        return {"model": self.source, **body}

    def text(self) -> str:
        unit = {"image-macs": "multiply-accumulates over the image tokens (3ndm)",
                "fastv-macs": "multiply-accumulates over the prompt, FastV's formula (2ndm)"}.get(
                    self.convention, "FLOPs (2 x MACs)")
        lines = [f"{self.source}: {self.shapes.description}",
                 f"workload: {json.dumps(self.workload.to_dict())}; {unit}", ""]
        if len(self.costs) > 1:
            return "\n".join([*lines, compare_table(self.costs)])
        c = self.costs[0]
        lines.append(parts_table(c))
        if self.convention == "flops":
            lines.append(f"\nprefill {format_flops(c.prefill)}, decode {format_flops(c.decode_per_token)} per token")
        lines.append(f"image tokens in the sequence: {c.image_tokens}, equivalent image tokens: "
                     f"{c.equivalent_image_tokens:.0f}")
        if self.budget_report is not None:
            lines.append(f"\nevery budget of this {c.method['name']} model (saving: the dense reference's FLOPs / "
                         "the budget's)\n")
            lines.append(budget_table(self.budget_report))
        return "\n".join(lines)


def model_shapes(preset_name: str | None, model_dir: str | None) -> tuple[Preset, MethodConfig | None, str]:
    """A preset (or a checkpoint's config as one), the checkpoint's method, and a name."""
    if preset_name:
        if preset_name == "list":
            raise LoupeError("presets: " + "; ".join(f"{k} ({v.description})" for k, v in PRESETS.items()))
        return preset(preset_name), None, preset_name
    from pathlib import Path

    from loupe.checkpoints import read_config
    folder = Path(model_dir or "")
    if not folder.is_dir():
        raise LoupeError(f"--model {model_dir!r} is not a folder")
    cfg, stored = read_config(folder)
    return Preset(cfg, f"checkpoint {folder}"), stored, str(folder)


def flops_report(preset_name: str | None, model_dir: str | None, specs: list[str] | None, workload: Workload, *,
                 hr_size: int | None = None, options: dict[str, Any] | None = None,
                 convention: str = "flops") -> FlopsReport:
    """The cost of the methods `specs` (`METHOD[@HR][,K=V...]`; default: the checkpoint's, or
    lowres) on a preset's or a checkpoint's shapes. A routed VISOR without the router's mix is
    costed at its budgets (the mix is what routing decides)."""
    shapes, stored, source = model_shapes(preset_name, model_dir)
    options = options or {}
    specs = specs or [stored.name if stored else "lowres"]
    check_shared_options(list(specs), options)
    methods = [stored if stored and spec == stored.name and not options and hr_size is None else
               parse_method(spec, hr_size, **options) for spec in specs]
    if workload.mix is None:
        methods = [dataclasses.replace(m, configuration="max") if getattr(m, "configuration", None) == "router"
                   else m for m in methods]
    costs = [estimate(shapes.config, m, workload, convention=convention, class_token=shapes.class_token)
             for m in methods]
    method = methods[0]
    method_cls = model_method_class(shapes.config, method.name)
    several = len(costs) == 1 and len(method_cls.budgets(shapes.config, method)) > 1 and convention == "flops"
    report = budgets(shapes.config, method, workload, class_token=shapes.class_token) if several else None
    return FlopsReport(source, shapes, workload, convention, costs, report)
