"""The method interface: how image tokens reach the decoder.

Shape legend: B batch, T new positions, I images, N image tokens per image, M HR tokens
per image, W text width.

A method is a small `nn.Module` the VLM consults at two points, never an
`if method == ...` ladder inside the model:

1. `encode(vlm, pixel_values)` turns pixels into `ImageInputs`: the features the model's
   image packing places in the token sequence at `<image>` positions (LR tokens for
   LLaVA, LR + HR for LLaVA-HD), plus what the method carries beside the sequence
   (FlexAttention's and XAttn's high-resolution features).
2. `run_layers(vlm, x, step)` runs the decoder layer loop and returns the hidden states
   and a `MethodReport`. The default is the plain loop; a method composes the decoder's
   own layers with the seams of `loupe.nn` - chosen rows with extra keys/values
   (`DecoderLayer.forward_rows`), an added sublayer (`loupe.nn.fusion.FusedLayer`), a
   token set that shrinks between layers (`loupe.nn.tokens.TokenSet`) - and never
   re-implements attention or a layer.

Typed state: what a method keeps between the calls of one request is its own dataclass in
`DecoderCache.method_state` (`cached_state` / `keep_state`); what it tells the caller is a
`MethodReport` (subclassed per method); choices made per call rather than per model are a
`RunOptions` subclass passed to `VLM.forward` / `generate` / `evaluate`. The options
(`MethodConfig`, saved in `loupe.json`) are frozen: they never change at run time.

New weights a method adds live in the method module itself (`method.*` keys), so every
pretrained key of the base checkpoint survives unchanged. Methods register by name with
`@register`; `build_method` looks them up in that table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload
from loupe.nn.decoder import AttnContext, Rows
from loupe.nn.kv_cache import DecoderCache, LayerCache
from loupe.nn.static import StaticStep
from loupe.nn.tokens import TokenSet
from loupe.schema import check

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass(frozen=True)
class MethodConfig:
    """Options of a method; subclasses add fields. Serialises to a flat dict with `name`.
    Frozen: the options a model was built with (and saves) never change at run time;
    `dataclasses.replace` makes another set."""

    name: ClassVar[str] = "base"
    # Values for fields a checkpoint's saved options lack (it was written before they existed)
    # where the behaviour it was trained with differs from the field's default.
    saved_defaults: ClassVar[dict[str, object]] = {}

    def __post_init__(self) -> None:
        check(self, f"{self.name}'s options")  # declared types and ranges (`loupe.schema`)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def validate(self, cfg: VLMConfig) -> None:
        """Raise a ConfigError if these options do not fit the model `cfg`."""

    def variant(self, cfg: VLMConfig) -> str:
        """What tells this run of the method apart in tables (VISOR: its configuration); "" if nothing."""
        return ""


@dataclass
class ImageFeatures:
    """What the (frozen) encoder computes for a batch of images, before a method assembles
    them; training with a frozen encoder computes these once per image."""

    lr: torch.Tensor  # (I, N, W) native-resolution tokens
    hr: torch.Tensor | None = None  # (I, M, W) high-resolution tokens (HR methods)
    image_sizes: torch.Tensor | None = None  # (I, 2) original (height, width) of each image

    def select(self, index: list[int], device: torch.device, dtype: torch.dtype) -> ImageFeatures:
        hr = None if self.hr is None else self.hr[index].to(device, dtype)
        sizes = None if self.image_sizes is None else self.image_sizes[index].to(device)
        return ImageFeatures(self.lr[index].to(device, dtype), hr, sizes)


@runtime_checkable
class LazyHR(Protocol):
    """HR features computed when first read (FlexAttention's `TileFeatures`)."""

    shape: tuple[int, int, int]  # (I, M, W)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Features (I, S, W) of HR tokens idx (I, S)."""
        ...

    def dense(self) -> torch.Tensor:
        """Every HR token's features (I, M, W)."""
        ...


@dataclass
class ImageInputs:
    """What `Method.encode` produced for a batch of images."""

    # (I, N, W) features placed in the sequence at the <image> positions, or per image (N_i, W)
    # where images differ in length (OneVision's AnyRes)
    sequence: torch.Tensor | list[torch.Tensor]
    # (I, M, W) HR features kept beside the sequence (FlexAttention, XAttn), or FlexAttention's
    # `TileFeatures` (tiles encoded on first use)
    hr: torch.Tensor | LazyHR | None = None
    image_sizes: torch.Tensor | None = None  # (I, 2) original (height, width), for methods that need it
    hr_valid: torch.Tensor | None = None  # (I, M) False at padding, where images' HR lengths differ (OneVision)


@dataclass
class RunOptions:
    """Per-call choices of a method that are not part of the model (a subclass per method,
    e.g. VISOR's configuration per sample); passed to `VLM.forward`, `generate`, `evaluate`."""


@dataclass
class MethodReport:
    """What a method reports about one forward call. Generic consumers (evaluation, the cost
    model, the bench) read these fields; a method's subclass adds its own."""

    selected_fraction: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) HR fraction selected
    projected_fraction: float | None = None  # HR tokens projected in this call / (HR tokens x HR layers)
    tiles_encoded: float | None = None  # HR tiles encoded so far in the request / tiles (lazy HR encoding)
    sa_layers: torch.Tensor | None = None  # (B,) layers in which the sample's visual tokens ran (VISOR)
    route: torch.Tensor | None = None  # (B,) the configuration a router chose per sample
    # layer -> (B, H, R, N) float32 attention of the watched rows over the image tokens (`Watch`)
    watched: dict[int, torch.Tensor] = field(default_factory=dict)

    def answer_selection(self) -> dict[int, torch.Tensor]:
        """Per layer, the HR tokens (B, M) the answer row (the last row) selected; {} for
        methods that select none."""
        return {}

    def answer_attention(self) -> dict[int, torch.Tensor]:
        """Per layer, the answer row's attention (B, N) over the LR image tokens, where the
        method computes it explicitly (FlexAttention's selection source); {} otherwise."""
        return {}


@dataclass
class Watch:
    """Rows whose attention over the image tokens a forward reports (`MethodReport.watched`),
    recomputed explicitly at `layers` through the score-rows seam; their outputs are the
    fused path's. Grounding supervision reads it (`loupe.grounding`); the plain layer loop
    (lowres, hd) watches, a method with its own loop reports nothing."""

    rows: torch.Tensor  # (B, R) index of each watched row among the call's rows
    valid: torch.Tensor  # (B, R) False at padding
    layers: tuple[int, ...]


@dataclass
class Step:
    """One forward call of the decoder, as the layer loop sees it."""

    tokens: TokenSet  # the call's rows: rope, mask, key validity, which are image rows
    cache: DecoderCache | None  # None: no caching (training, scoring)
    images: ImageInputs | None  # None on decode steps; the method keeps what it needs in its cached state
    loss_rows: torch.Tensor | None = None  # (B, T) True at rows whose next token is scored (training)
    run: RunOptions | None = None  # the method's per-call choices
    watch: Watch | None = None  # rows whose attention over the image is reported

    @property
    def ctx(self) -> AttnContext:
        return self.tokens.ctx

    @property
    def key_valid(self) -> torch.Tensor:
        """(B, Tk) False at padding, over cached + new positions."""
        return self.tokens.key_valid

    @property
    def image_mask(self) -> torch.Tensor:
        """(B, T) True at the <image> positions of the new rows."""
        return self.tokens.image

    def layer_cache(self, i: int) -> LayerCache | None:
        return self.cache.layers[i] if self.cache is not None else None


S = TypeVar("S")


def image_columns(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) positions of each row's image tokens, from the (B, T) mask; every row must hold
    the same number of them (one image each)."""
    counts = image_mask.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise LoupeError(f"watching rows needs one image of equal length in every row of the batch; the rows hold "
                         f"{sorted(set(counts.tolist()))} image tokens")
    return image_mask.nonzero()[:, 1].view(image_mask.shape[0], -1)


def cached_state(step: Step, kind: type[S]) -> S | None:
    """The method's per-request state kept in the cache by an earlier call (None: none yet)."""
    state = step.cache.method_state if step.cache is not None else None
    if state is None:
        return None
    if not isinstance(state, kind):
        raise LoupeError(f"the cache holds {type(state).__name__}, not {kind.__name__}: a cache serves one "
                         "request of one method")
    return state


def keep_state(step: Step, state: object) -> None:
    """Keep `state` for the later calls of this request (no-op without a cache)."""
    if step.cache is not None:
        step.cache.method_state = state


@dataclass
class TrainStep:
    """Where training is when it calls `Method.on_train_step`."""

    step: int  # 0-based
    epoch: float  # samples seen / training set size
    generator: torch.Generator  # the training run's generator for the method's draws


@dataclass
class TrainDraw:
    """What a method chose for one training step: the run options of the step's forward,
    and a label counted in the training log (None: nothing to count)."""

    run: RunOptions | None = None
    label: str | None = None


class Method(nn.Module):
    """Base class: LLaVA behaviour (image tokens in the sequence, plain layer loop)."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    run_class: ClassVar[type[RunOptions]] = RunOptions

    def __init__(self, cfg: VLMConfig, options: MethodConfig) -> None:
        super().__init__()
        self.validate_options(cfg, options)
        self.cfg, self.options = cfg, options

    @classmethod
    def validate_options(cls, cfg: VLMConfig, options: MethodConfig) -> None:
        """Raise a ConfigError if `options` do not fit model `cfg` for this form of the method
        (a family's form may check them otherwise, e.g. OneVision's has no hr_size)."""
        options.validate(cfg)

    def tokens_per_image(self) -> int:
        """How many <image> ids input_ids must carry for each image."""
        return self.cfg.tokens_per_image

    def tokens_for(self, height: int, width: int) -> int:
        """<image> ids for one image of (height, width) original pixels (OneVision's count
        depends on it; LLaVA-1.5's does not)."""
        return self.tokens_per_image()

    def tokens_label(self) -> str:
        """The image tokens per image, as `loupe info` shows them."""
        return str(self.tokens_per_image())

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

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(vlm.image_features(pixel_values))  # (I, N, W)

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return ImageInputs(features.lr)

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, MethodReport]:
        report, watch = MethodReport(), step.watch
        rows = None if watch is None else Rows(watch.rows, watch.valid, columns=image_columns(step.image_mask))
        watched = () if watch is None else watch.layers
        for i, layer in enumerate(vlm.decoder.layers):
            if rows is not None and i in watched:
                x, report.watched[i] = layer.forward_rows(x, step.ctx, step.layer_cache(i), rows)
            else:
                x = layer(x, step.ctx, step.layer_cache(i))
        return x, report

    # ---- the decode step at static shapes (`loupe.nn.static`, `generate(..., decode="compiled")`) ----
    def static_decode(self) -> str | None:
        """Why this method's decode step cannot run at static shapes; None: it can.

        The plain layer loop can. A method that gives its own `run_layers` must give the
        static form of its decode step too (`decode_layers`, and `decode_keys` where its layers
        cache different columns), or it is refused here, never misrun."""
        cls = type(self)
        if cls.run_layers is not Method.run_layers and cls.decode_layers is Method.decode_layers:
            return f"method {self.name!r} has its own layer loop and no static form of its decode step"
        return None

    def decode_layers(self, vlm: VLM, x: torch.Tensor, step: StaticStep) -> torch.Tensor:
        """One decode row (B, 1, W) through the layers at static shapes; `run_layers`'s decode step."""
        for i, layer in enumerate(vlm.decoder.layers):
            x = layer(x, step.ctx(i), step.layer_cache(i))
        return x

    def decode_keys(self, cache: DecoderCache, i: int) -> torch.Tensor:
        """(B, length_i): which of the columns layer i has cached its next decode row may see
        (the key validity of the cache segment layer i belongs to)."""
        segment = max((s for s in cache.segments if s.first_layer <= i), key=lambda s: s.first_layer)
        if segment.key_valid is None:
            raise LoupeError("the cache is empty: run the prefill first")
        return segment.key_valid

    def check_run(self, run: RunOptions | None) -> None:
        """Refuse run options of another method."""
        if run is not None and not isinstance(run, self.run_class):
            raise LoupeError(f"method {self.name!r} takes {self.run_class.__name__} run options, "
                             f"not {type(run).__name__}")

    def run_options(self, run: RunOptions | None) -> MethodConfig:
        """The options that describe this model run with `run` (for the cost model and labels)."""
        return self.options

    def init_from_base(self, vlm: VLM) -> None:
        """Initialise new weights from the base model's (called by `loupe convert`)."""

    def init_buffers(self) -> None:
        """Give the method's persistent buffers their initial values (a checkpoint from before
        a buffer existed lacks it)."""

    def on_train_step(self, where: TrainStep) -> TrainDraw:
        """Called by `loupe.train` before each step (FlexAttention opens its gate, VISOR draws
        the step's configuration)."""
        return TrainDraw()

    def on_train_end(self) -> None:
        """Called by `loupe.train` after the last step, before the final save."""

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """How this method spends compute, for `loupe.cost` (a classmethod: costing a 13B
        preset builds no weights). The base is plain LLaVA: one native-size encoder pass."""
        n = cfg.tokens_per_image
        return CostPlan(image_tokens=n, vision={"vision.lr": (cfg.vision.image_size, 1)}, projector_rows=n)

    @classmethod
    def hr_label(cls, cfg: VLMConfig, options: MethodConfig) -> int | None:
        """The HR image side that tells runs of this method apart (`flexattn@1008`); None: none."""
        hr = getattr(options, "resolved_hr_size", None)
        return hr(cfg) if hr else None

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
# Image packings whose inputs differ from LLaVA-1.5's (OneVision's "anyres"): the methods that
# have a form there, by name. A method absent from its model's table is refused, not misrun.
FAMILY_METHODS: dict[str, dict[str, type[Method]]] = {}
FAMILY_NAMES = {"anyres": "LLaVA-OneVision"}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def register_family(packing: str) -> Callable[[type[Method]], type[Method]]:
    """Register `cls` as the form of its method (by name) on models of `packing`."""
    def add(cls: type[Method]) -> type[Method]:
        FAMILY_METHODS.setdefault(packing, {})[cls.name] = cls
        return cls
    return add


def method_options(name: str, **options: Any) -> MethodConfig:
    """The options dataclass of method `name`, filled from keyword arguments."""
    cls = _method_class(name)
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {unknown}; it takes {sorted(known) or 'none'}")
    return cls.config_class(**options)


def parse_method(spec: str, hr_size: int | None = None, /, **options: Any) -> MethodConfig:
    """'flexattn@1008' or 'visor@1008,configuration=min' -> the method's options (hr_size
    from '@', else `hr_size` if the method has one). `options` apply where the method has
    such a field; the spec's own KEY=VALUE pairs (values read as JSON) apply to it alone."""
    head, *pairs = spec.split(",")
    name, _, size = head.partition("@")
    fields = {f.name for f in dataclasses.fields(_method_class(name).config_class)}
    chosen = {k: v for k, v in options.items() if k in fields and v is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise LoupeError(f"{pair!r} in {spec!r} is not KEY=VALUE with KEY an option of {name!r} "
                             f"({sorted(fields)})")
        try:
            chosen[key] = json.loads(value)
        except json.JSONDecodeError:
            chosen[key] = value
    if size:
        if "hr_size" not in fields:
            raise LoupeError(f"method {name!r} takes no HR size, but {spec!r} gives one")
        try:
            chosen["hr_size"] = int(size)
        except ValueError:
            raise LoupeError(f"HR size {size!r} in {spec!r} is not an integer") from None
    elif hr_size is not None and "hr_size" in fields and "hr_size" not in chosen:
        chosen["hr_size"] = hr_size
    return method_options(name, **chosen)


def check_shared_options(specs: list[str], options: dict[str, Any]) -> None:
    """Options given once for several methods (`-o` with `--compare`) must each be an option
    of at least one of them: a typo would otherwise change nothing, silently."""
    names = [spec.split(",")[0].partition("@")[0] for spec in specs]
    taken = {f.name for n in names for f in dataclasses.fields(_method_class(n).config_class)}
    unused = sorted(set(options) - taken)
    if unused:
        raise ConfigError(f"option(s) {unused} belong to none of the methods {names}; they take {sorted(taken)}")


def method_label(options: MethodConfig, cfg: VLMConfig) -> str:
    """`flexattn@1008`, `visor@672 [min]`: a method and what tells this run of it apart."""
    hr = model_method_class(cfg, options.name).hr_label(cfg, options)
    variant = options.variant(cfg)
    return options.name + (f"@{hr}" if hr else "") + (f" [{variant}]" if variant else "")


def saved_method_options(name: str, **saved: Any) -> MethodConfig:
    """The options a checkpoint saved (`loupe.json`), fields it predates at what it was trained with."""
    cls = _method_class(name).config_class
    return method_options(name, **{**cls.saved_defaults, **saved})


def build_method(cfg: VLMConfig, options: MethodConfig) -> Method:
    return model_method_class(cfg, options.name)(cfg, options)


def model_method_class(cfg: VLMConfig, name: str) -> type[Method]:
    """The class that runs method `name` on model `cfg` (its family's form where it has one)."""
    cls = _method_class(name)
    table = FAMILY_METHODS.get(cfg.image_packing)
    if table is None:
        return cls
    if name not in table:
        family = FAMILY_NAMES.get(cfg.image_packing, cfg.image_packing)
        raise ConfigError(f"method {name!r} has no {family} form yet (image_packing={cfg.image_packing!r}); "
                          f"on this model choose one of {sorted(table)}")
    return table[name]


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise LoupeError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
