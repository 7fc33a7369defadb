"""The method interface: how image tokens reach the decoder.

Shape legend: B batch, T new positions, I images, N image tokens per image, W text width.

A method is a small `nn.Module` the VLM consults at two points, never an
`if method == ...` ladder inside the model:

1. `encode(vlm, pixel_values)` turns pixels into `ImageInputs`: the features spliced into
   the token sequence at `<image>` positions (LR tokens for LLaVA, LR + HR for LLaVA-HD),
   plus whatever else the method carries beside the sequence (FlexAttention's and
   XAttn's high-resolution features, VISOR's visual stream).
2. `run_layers(vlm, x, step)` runs the decoder layer loop. The default is the plain
   loop; a method overrides it to give some layers extra keys/values (FlexAttention), a
   cross-attention sublayer (XAttn), a second stream (VISOR) or fewer tokens (pruning).

New weights a method adds live in the method module itself (`method.*` keys), so every
pretrained key of the base checkpoint survives unchanged. Methods register by name with
`@register`; `build_method` looks them up in that table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload
from loupe.nn.decoder import AttnContext
from loupe.nn.kv_cache import DecoderCache

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass
class MethodConfig:
    """Options of a method; subclasses add fields. Serialises to a flat dict with `name`."""

    name: ClassVar[str] = "base"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def validate(self, cfg: VLMConfig) -> None:
        """Raise a ConfigError if these options do not fit the model `cfg`."""

    def variant(self, cfg: VLMConfig) -> str:
        """What tells this run of the method apart in tables (VISOR: its configuration); "" if nothing."""
        return ""


@dataclass
class ImageInputs:
    """What `Method.encode` produced for a batch of images."""

    sequence: torch.Tensor  # (I, N, W) features spliced in at the <image> positions
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # beside the sequence


@dataclass
class Step:
    """One forward call of the decoder, as the layer loop sees it."""

    ctx: AttnContext  # rope, mask, kernel of the new rows
    cache: DecoderCache | None  # None: no caching (training, scoring)
    images: ImageInputs | None  # None on decode steps; the method memoises in cache.method_state
    key_valid: torch.Tensor  # (B, Tk) False at padding, over cached + new positions
    image_mask: torch.Tensor  # (B, T) True at <image> positions of the new rows
    loss_rows: torch.Tensor | None = None  # (B, T) True at rows whose next token is scored (training)
    info: dict[str, Any] = field(default_factory=dict)  # what the method reports (e.g. selection masks)


class Method(nn.Module):
    """Base class: LLaVA behaviour (spliced image tokens, plain layer loop)."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: VLMConfig, options: MethodConfig) -> None:
        super().__init__()
        options.validate(cfg)
        self.cfg, self.options = cfg, options

    def tokens_per_image(self) -> int:
        """How many <image> ids input_ids must carry for each image."""
        return self.cfg.tokens_per_image

    def image_size(self) -> int:
        """Side in pixels of the images this method takes (the HR size for HR methods)."""
        return self.cfg.vision.image_size

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        """Pixels (I, 3, S, S) -> ImageInputs. image_sizes (I, 2): original (height, width)
        before square padding, for methods that care where the padding is."""
        return self.assemble(self.features(vlm, pixel_values), image_sizes)

    # `encode` = `assemble(features(...))`, split so that training with a frozen encoder can
    # compute `features` once per image and share them between methods of the same `feature_key`.
    def feature_key(self) -> tuple[object, ...]:
        """Methods with equal keys compute equal `features` from the same pixels."""
        return ("native", self.cfg.vision.image_size)

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lr": vlm.image_features(pixel_values)}  # (I, N, W)

    def assemble(self, features: dict[str, torch.Tensor], image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return ImageInputs(features["lr"])

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> torch.Tensor:
        for i, layer in enumerate(vlm.decoder.layers):
            x = layer(x, step.ctx, step.cache.layers[i] if step.cache else None)
        return x

    def init_from_base(self, vlm: VLM) -> None:
        """Initialise new weights from the base model's (called by `loupe convert`)."""

    def on_train_step(self, gen: torch.Generator) -> dict[str, Any]:
        """Called by `loupe.train` before each step (e.g. VISOR draws the step's
        configuration); returns what to log for the step."""
        return {}

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """How this method spends compute, for `loupe.cost` (a classmethod: costing a 13B
        preset builds no weights). The base is plain LLaVA: one native-size encoder pass."""
        n = cfg.tokens_per_image
        return CostPlan(image_tokens=n, vision={"vision.lr": (cfg.vision.image_size, 1)}, projector_rows=n)

    @classmethod
    def budgets(cls, cfg: VLMConfig, options: MethodConfig) -> list[MethodConfig]:
        """The compute budgets one trained model of this method can run at (VISOR: one per
        configuration), cheapest first; most methods have just the one."""
        return [options]

    @classmethod
    def dense_reference(cls, cfg: VLMConfig, options: MethodConfig) -> MethodConfig | None:
        """The same model spending full compute on all its image tokens, which `loupe flops`
        reports a method's budgets against (None: no such reference)."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_options(name: str, **options: Any) -> MethodConfig:
    """The options dataclass of method `name`, filled from keyword arguments."""
    cls = _method_class(name)
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {unknown}; it takes {sorted(known) or 'none'}")
    return cls.config_class(**options)


def build_method(cfg: VLMConfig, options: MethodConfig) -> Method:
    return _method_class(options.name)(cfg, options)


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise LoupeError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
