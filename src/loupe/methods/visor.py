"""`visor`: VISOR, VISion On Request (Bulat et al., CVPR 2026; DESIGN.md section 3).

Shape legend: B batch, T new rows (text and visual, in sequence order), Tt text rows,
Nv visual tokens per image (LR + HR), Tk keys, L decoder layers, W text width,
H heads, D head dim, C configurations.

Two streams. Text rows run through every decoder layer; the visual rows (all N LR and
M HR tokens of the image, spliced in at the `<image>` position exactly as `hd` splices
them) are kept out of the text stream except at:
- SA layers (`sa_layers`): the full decoder layer over the joint sequence - the ONLY place
  the visual rows are updated, and where text sees them as ordinary keys;
- CA layers (`ca_layers`): before the layer's own text-only pass, the text rows get
  t + tanh(gate) * CrossAttn(norm(t), V'), V' = norm(V) + DWConv_7(norm(V)) (a conditional
  position embedding over the visual sequence). The gate starts at 0, so a converted model
  adds nothing until trained.
Every other layer (and an SA layer a sample does not run) is text-only: text rows attend
to text keys only.

On the decoder's seams: the CA module is a sublayer before the layer (`FusedLayer`, its
weights under `method.cross.N`); the text stream is a subset of the call's token set
(`TokenSet.subset`), the joint layers the whole set with the skipped samples' visual keys
hidden (`TokenSet.with_keys`); every layer is the decoder's own `DecoderLayer`.

Positions and order: the joint sequence is the prompt in its own order, so an SA layer is
the standard decoder layer over it, and with every layer SA and no CA layer the model IS
`hd` (tiles): the starting point a LLaVA checkpoint gives. Text keeps its positions at
text-only layers. In CA every text row sees every visual token (the image is given before
any answer is produced).

Configurations: a configuration is the set of SA layers a sample runs; any subset of
`sa_layers` can run, and a batch may mix them (a layer that any sample runs as SA
computes the joint rows for the batch, with the visual keys hidden from, and the visual
rows left unchanged for, the samples that skip it - exact, and wasted work only for
mixed batches). `configurations` lists the budgets the model is trained for and the
router chooses among (cheapest first); the option `configuration` says which runs by
default: "max", "min", an index, "sample" (universal training: one configuration drawn per
step, by `on_train_step`) or "router". A call chooses otherwise with `VisorRun` (a
configuration, or one SA-layer set per sample); the saved options never change at run time.

Router: a learned routing token is appended after the prompt for the layers before the
first SA layer (it sees the prompt, and the image through the CA layers; no row sees it,
and its cache entries are dropped), and a small MLP on its hidden state there picks the
configuration per sample (argmax). It is trained offline (`loupe.visor_train`).

Generation: CA keys/values are projected once per request from the visual stream as it is
at that layer; each layer's KV cache holds what that layer attends to - the joint
sequence at layers some sample ran as SA, only the text rows elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from loupe.config import TextConfig, VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload, attention, decoder_layer, linear
from loupe.methods.base import (
    ImageFeatures,
    ImageInputs,
    MethodConfig,
    MethodReport,
    RunOptions,
    Step,
    TrainDraw,
    TrainStep,
    cached_state,
    keep_state,
    register,
)
from loupe.methods.hd import HDConfig
from loupe.methods.highres import HighResMethod, TiledConfig, tiled_plan
from loupe.methods.visionzip import VisionZipConfig, tiled_crops, zip_flops, zipped_tiles
from loupe.nn.decoder import DecoderLayer, RMSNorm
from loupe.nn.fusion import CrossAttention, FusedLayer
from loupe.nn.kv_cache import DecoderCache, LayerCache
from loupe.nn.static import StaticStep

if TYPE_CHECKING:
    from loupe.vlm import VLM

MODES = ("max", "min", "sample", "router")


@dataclass(frozen=True)
class VisorConfig(TiledConfig):
    """hr_size 0: 3x the native size, as k x k native tiles (LR + HR = 7290 tokens for LLaVA-OV at 1134)."""

    name: ClassVar[str] = "visor"
    ca_layers: list[int] | None = None  # None: L/3 layers spread uniformly over depth
    sa_layers: list[int] | None = None  # None: L/3 layers, each the one after a CA layer
    configurations: list[list[int]] | None = None  # SA subsets trained for, cheapest first; None: nested ladder
    configuration: str | int = "max"  # max | min | sample | router | index into configurations
    conv_kernel: int = 7  # conditional position embedding: depthwise 1-D convolution
    router_hidden: int = 0  # 0: the text width
    # A token-reduction front end on the visual stream (the paper's VISOR + 2x reduction): VisionZip
    # keeps this fraction of every crop's tokens (0.5: 2x); None: every visual token.
    visionzip: float | None = None
    visionzip_signal: str = "class"  # its attention signal: class | mean (Loupe's, a tower without class token)

    def front_end(self) -> VisionZipConfig | None:
        """The VisionZip options of the front end (its default 54:10 split of the budget), if any."""
        return None if self.visionzip is None else VisionZipConfig(ratio=self.visionzip, signal=self.visionzip_signal)

    def resolved_ca(self, cfg: VLMConfig) -> list[int]:
        if self.ca_layers is not None:
            return sorted(self.ca_layers)
        layers = cfg.text.num_layers
        n = max(1, layers // 3)
        return [i * layers // n for i in range(n)]

    def resolved_sa(self, cfg: VLMConfig) -> list[int]:
        if self.sa_layers is not None:
            return sorted(self.sa_layers)
        ca = self.resolved_ca(cfg)
        return [c + 1 for c in ca if c + 1 < cfg.text.num_layers and c + 1 not in ca]

    def resolved_configurations(self, cfg: VLMConfig) -> list[list[int]]:
        """The configurations, cheapest (fewest SA layers) first."""
        sa = self.resolved_sa(cfg)
        if self.configurations is None:
            return [sa[:k] for k in range(len(sa) + 1)]
        return sorted((sorted(c) for c in self.configurations), key=lambda c: (len(c), c))

    def variant(self, cfg: VLMConfig) -> str:
        if not isinstance(self.configuration, int):
            chosen = self.configuration
        else:
            layers = self.resolved_configurations(cfg)[self.configuration]
            chosen = "SA " + (",".join(map(str, layers)) if layers else "none")
        front = self.front_end()
        return chosen if front is None else f"{chosen}, visionzip {self.visionzip:g} ({front.variant(cfg)})"

    def validate(self, cfg: VLMConfig) -> None:
        super().validate(cfg)
        self.validate_layers(cfg)
        self.validate_front_end(cfg)

    def validate_front_end(self, cfg: VLMConfig) -> None:
        front = self.front_end()
        if front is not None:
            try:
                front.validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"visor's visionzip front end: {e}") from None

    def validate_layers(self, cfg: VLMConfig) -> None:
        """The layer placement and configurations (apart from how the visual tokens are made;
        their types are checked when the options are made, `loupe.schema`)."""
        layers = cfg.text.num_layers
        ca, sa = self.resolved_ca(cfg), self.resolved_sa(cfg)
        for what, chosen in (("ca_layers", ca), ("sa_layers", sa)):
            bad = [i for i in chosen if not 0 <= i < layers]
            if bad:
                raise ConfigError(f"{what}={chosen} names layer(s) {bad} out of range: the model has {layers} "
                                  f"decoder layers (0..{layers - 1})")
            if len(set(chosen)) != len(chosen):
                raise ConfigError(f"{what}={chosen} lists a layer twice")
        if set(ca) & set(sa):
            raise ConfigError(f"layer(s) {sorted(set(ca) & set(sa))} are both CA and SA layers; a layer is one kind")
        configs = self.resolved_configurations(cfg)
        for c in configs:
            check_subset(c, sa)
        if not configs or len({tuple(c) for c in configs}) != len(configs):
            raise ConfigError(f"configurations={self.configurations} must be a non-empty list of distinct subsets")
        if not (self.configuration in MODES or (isinstance(self.configuration, int)
                                                 and 0 <= self.configuration < len(configs))):
            raise ConfigError(f"configuration={self.configuration!r}: choose one of {list(MODES)} or an index "
                              f"0..{len(configs) - 1} into the {len(configs)} configurations")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ConfigError(f"conv_kernel={self.conv_kernel} must be odd and positive")


def check_subset(configuration: Sequence[int], sa_layers: Sequence[int]) -> None:
    outside = sorted(set(configuration) - set(sa_layers))
    if outside:
        raise ConfigError(f"configuration {sorted(configuration)} is not a subset of the selectable SA layers "
                          f"{sorted(sa_layers)}: layer(s) {outside} are not SA layers")


class VisualCrossAttention(nn.Module):
    """One CA layer: text queries, keys/values from the visual stream with its position embedding."""

    def __init__(self, cfg: TextConfig, kernel: int) -> None:
        super().__init__()
        w = cfg.hidden_size
        self.visual_norm = RMSNorm(w, cfg.rms_norm_eps)
        self.position = nn.Conv1d(w, w, kernel, padding=kernel // 2, groups=w)  # depthwise
        self.attn = CrossAttention(cfg)  # query pre-norm, q/k/v/o, zero-initialised tanh gate

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual stream (B, Nv, W) -> keys, values (B, H, Nv, D)."""
        h = self.visual_norm(visual)
        h = h + self.position(h.transpose(1, 2)).transpose(1, 2)  # (B, Nv, W)
        return self.attn.keys_values(h)

    def forward(self, text: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], kernel: str) -> torch.Tensor:
        """The residual update of the text rows (B, Tt, W); `FusedLayer` adds it."""
        return self.attn(text, kv, kernel)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.attn.reset()
        with torch.no_grad():
            self.visual_norm.weight.fill_(1.0)
            nn.init.normal_(self.position.weight, std=0.02)
            self.position.bias.zero_()


class Router(nn.Module):
    """Routing-token hidden state (B, W) -> configuration logits (B, C)."""

    def __init__(self, cfg: TextConfig, hidden: int, classes: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))


@dataclass
class VisorRun(RunOptions):
    """VISOR's per-call choices (none: the model's own `configuration` option decides)."""

    configuration: str | int | None = None  # max | min | router | an index into the configurations
    configurations: list[list[int]] | None = None  # SA layers per sample (or one set for all); overrides both
    routing_only: bool = False  # stop once the routing state is known (`Visor.routing_states`)


@dataclass
class Streams:
    """Where the two streams are in this call's rows, and the request's routing."""

    text_idx: torch.Tensor  # (B, Tt) row index of each text row
    visual_idx: torch.Tensor  # (B, Nv') row index of each visual row (Nv' = 0 on decode steps)
    visual_cols: torch.Tensor  # (B, Tk) True at key columns (cached + new) holding visual tokens
    sa: torch.Tensor  # (B, L) True where the sample runs the layer as SA


@dataclass
class VisorState:
    """Kept in the cache between calls of one request."""

    sa: torch.Tensor  # (B, L)
    visual_cols: torch.Tensor  # (B, Tk)
    joint: list[bool]  # per layer: does its cache hold the visual columns
    ca_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class VisorReport(MethodReport):
    """VISOR's report of a prefill: who ran which layer as SA, and the router's view."""

    sa: torch.Tensor | None = None  # (B, L) True where the sample ran the layer as SA
    routing_state: torch.Tensor | None = None  # (B, W) the routing token's hidden state (when routed)
    router_logits: torch.Tensor | None = None  # (B, C)


@register
class Visor(HighResMethod):
    name = "visor"
    config_class = VisorConfig
    run_class = VisorRun
    options: VisorConfig

    def __init__(self, cfg: VLMConfig, options: VisorConfig) -> None:
        super().__init__(cfg, options)
        t = cfg.text
        self.ca_layers, self.sa_layers = options.resolved_ca(cfg), options.resolved_sa(cfg)
        self.configurations = options.resolved_configurations(cfg)
        self.cross = nn.ModuleDict({str(i): VisualCrossAttention(t, options.conv_kernel) for i in self.ca_layers})
        self.route_token = nn.Parameter(torch.zeros(t.hidden_size))
        self.router = Router(t, options.router_hidden or t.hidden_size, len(self.configurations))

    # ---- images: LR + HR, all in the visual stream ----------------------------------------------------
    def tokens_per_image(self) -> int:
        front = self.options.front_end()
        if front is not None:  # every crop (the LR image, each HR tile) keeps its VisionZip tokens
            return tiled_crops(self.cfg, self.hr_size) * front.kept(self.cfg)
        return self.cfg.tokens_per_image + (self.hr_size // self.cfg.vision.patch_size) ** 2

    def feature_key(self) -> tuple[object, ...]:
        front = self.options.front_end()
        return super().feature_key() + (() if front is None else tuple(sorted(front.to_dict().items())))

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        """LR and HR features; with the front end, each crop's VisionZip tokens, LR crop first,
        then the HR tiles in row-major order: (I, (1 + k*k) * K, W) as the LR part."""
        front = self.options.front_end()
        if front is None:
            return super().features(vlm, pixel_values)
        return ImageFeatures(zipped_tiles(vlm, pixel_values, front))

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        if self.options.front_end() is not None:
            return ImageInputs(features.lr)  # (I, Nv, W): the reduced crops
        return ImageInputs(torch.cat([features.lr, self.hr_of(features)], dim=1))  # (I, N + M, W)

    def check_image_tokens(self, counts: torch.Tensor, images: ImageInputs) -> None:
        """Refuse a batch that is not one image per sample of the expected length (the two
        streams are gathered as (B, Nv, W), so every sample has the same Nv)."""
        expected = self.tokens_per_image()
        if bool((counts != expected).any()):
            raise LoupeError(f"visor takes exactly one image per sample ({expected} image tokens); the batch "
                             f"holds {counts.tolist()} image tokens per sample")

    # ---- configurations ----------------------------------------------------------------------------
    def masks(self, configurations: Sequence[Sequence[int]]) -> torch.Tensor:
        """SA-layer sets -> (len, L) bool masks; each must be a subset of the SA layers."""
        out = torch.zeros(len(configurations), self.cfg.text.num_layers, dtype=torch.bool)
        for row, c in enumerate(configurations):
            check_subset(c, self.sa_layers)
            out[row, list(c)] = True
        return out.to(self.route_token.device)

    def on_train_step(self, where: TrainStep) -> TrainDraw:
        """Universal training ("sample"): draw one configuration for this step, uniformly."""
        if self.options.configuration != "sample":
            return TrainDraw()
        k = int(torch.randint(len(self.configurations), (1,), generator=where.generator))
        return TrainDraw(VisorRun(configuration=k), str(k))

    def _mode(self, run: VisorRun | None) -> str | int:
        return run.configuration if run is not None and run.configuration is not None else self.options.configuration

    def _fixed_choice(self, run: VisorRun | None) -> int | None:
        """The configuration every sample runs, or None when the router decides."""
        mode = self._mode(run)
        if isinstance(mode, int):
            if not 0 <= mode < len(self.configurations):
                raise LoupeError(f"configuration {mode} is not an index 0..{len(self.configurations) - 1} into "
                                 f"the {len(self.configurations)} configurations")
            return mode
        if mode not in MODES:
            raise LoupeError(f"configuration={mode!r}: choose one of {list(MODES)} or an index")
        return {"max": len(self.configurations) - 1, "min": 0, "sample": len(self.configurations) - 1}.get(mode)

    def run_options(self, run: RunOptions | None) -> MethodConfig:
        """The options describing a run at one configuration (for the cost model and labels)."""
        assert run is None or isinstance(run, VisorRun)
        if run is None or run.configuration is None:
            return self.options
        return dataclasses.replace(self.options, configuration=run.configuration)

    # ---- the layer loop ----------------------------------------------------------------------------
    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, VisorReport]:
        run = step.run if isinstance(step.run, VisorRun) else None
        streams, state = self._streams(step, x.shape[0], run)
        report = VisorReport()
        t = x.gather(1, _rows(streams.text_idx, x))  # (B, Tt, W)
        v = x.gather(1, _rows(streams.visual_idx, x))  # (B, Nv', W)
        route = self._wants_routing(step, run)  # then sa_layers is not empty: routing ends at sa_layers[0]
        text = step.tokens.subset(streams.text_idx, ~streams.visual_cols)  # the same for every text-only layer
        if route:
            t = torch.cat([t, self.route_token.to(t.dtype).expand(t.shape[0], 1, -1)], dim=1)  # (B, Tt+1, W)
            after_prompt = step.key_valid.long().sum(-1, keepdim=True)  # (B, 1) the position after the prompt
            routed = text.extended(after_prompt)
        for i, layer in enumerate(vlm.decoder.layers):
            if route and i == self.sa_layers[0]:
                t = self._route(t, streams, step, report)
                route = False
                if run is not None and run.routing_only:  # routing_states(): the caller reads the report
                    return x, report
            cache = step.layer_cache(i)
            fused = self._fused(i, layer, v, state, step) if str(i) in self.cross else None
            joint = bool(streams.sa[:, i].any()) if state is None or step.images is not None else state.joint[i]
            if joint:
                t = fused.fuse(t) if fused is not None else t
                t, v = self._joint_layer(layer, t, v, streams, step, i, cache)
            else:
                t = (fused or layer)(t, (routed if route else text).ctx, cache)
            if state is not None and step.images is not None:
                state.joint.append(joint)
        if step.images is not None:
            report.sa, report.sa_layers = streams.sa, streams.sa.sum(-1)  # (B, L), (B,)
        return self._merge(t, v, streams, x), report

    def decode_layers(self, vlm: VLM, x: torch.Tensor, step: StaticStep) -> torch.Tensor:
        """A decode row is text: each layer over the columns it caches (`decode_keys`: a joint
        layer's visual columns are hidden from the samples that skip it), CA first where there is one."""
        state = step.state
        if not isinstance(state, VisorState):
            raise LoupeError("visor needs an image: pass pixel_values (or encoded images) with the prompt")
        for i, layer in enumerate(vlm.decoder.layers):
            if str(i) in self.cross:
                ca = partial(self.cross[str(i)], kv=state.ca_kv[i], kernel=step.kernel)
                x = FusedLayer(layer, ca, "input")(x, step.ctx(i), step.layer_cache(i))
            else:
                x = layer(x, step.ctx(i), step.layer_cache(i))
        return x

    def decode_keys(self, cache: DecoderCache, i: int) -> torch.Tensor:
        """A joint layer caches every column (visual ones hidden from samples that do not run it
        as SA); a text-only layer caches the text columns alone."""
        state = cache.method_state
        key_valid = cache.key_valid
        if not isinstance(state, VisorState) or key_valid is None:
            raise LoupeError("visor decodes after its prefill: the cache holds no VISOR request")
        if state.joint[i]:
            return key_valid & ~(state.visual_cols & ~state.sa[:, i, None])  # (B, Tk)
        return key_valid[~state.visual_cols].view(key_valid.shape[0], -1)  # (B, Tt)

    def _fused(self, i: int, layer: DecoderLayer, v: torch.Tensor, state: VisorState | None,
               step: Step) -> FusedLayer:
        """Layer i with its CA module before it, over the text rows."""
        ca = partial(self.cross[str(i)], kv=self._cross_kv(i, v, state), kernel=step.ctx.kernel)
        return FusedLayer(layer, ca, "input")

    def _streams(self, step: Step, batch: int, run: VisorRun | None) -> tuple[Streams, VisorState | None]:
        new_visual = step.image_mask  # (B, T)
        counts = new_visual.sum(-1)
        kept = cached_state(step, VisorState)
        if step.images is not None:
            if kept is not None:
                raise LoupeError("visor takes its image in the first call of a request (the prefill)")
            self.check_image_tokens(counts, step.images)
            sa = self._initial_sa(batch, run)
            state = VisorState(sa, new_visual, []) if step.cache is not None else None
            if state is not None:
                keep_state(step, state)
        else:
            if kept is None:
                raise LoupeError("visor needs an image: pass pixel_values (or encoded images) with the prompt")
            state = kept
            state.visual_cols = torch.cat([state.visual_cols, new_visual], dim=1)
            sa = state.sa
        visual_cols = state.visual_cols if state is not None else new_visual
        order = torch.sort(new_visual.to(torch.int8), dim=1, stable=True).indices  # text rows first, in order
        tt = new_visual.shape[1] - int(counts[0]) if counts.numel() else new_visual.shape[1]
        return Streams(order[:, :tt], order[:, tt:], visual_cols, sa), state

    def _initial_sa(self, batch: int, run: VisorRun | None) -> torch.Tensor:
        """(B, L) SA layers per sample before routing (routing fills them in at the first SA layer)."""
        if run is not None and run.configurations is not None:
            forced = self.masks(run.configurations)
            if forced.shape[0] not in (1, batch):
                raise LoupeError(f"{forced.shape[0]} configurations given for a batch of {batch}")
            return forced.expand(batch, -1).clone()
        choice = self._fixed_choice(run)
        if choice is None:  # router: decided before the first SA layer
            return torch.zeros(batch, self.cfg.text.num_layers, dtype=torch.bool, device=self.route_token.device)
        return self.masks([self.configurations[choice]]).expand(batch, -1).clone()

    def _wants_routing(self, step: Step, run: VisorRun | None) -> bool:
        forced = run is not None and run.configurations is not None
        return step.images is not None and not forced and self._fixed_choice(run) is None and bool(self.sa_layers)

    def _route(self, t: torch.Tensor, streams: Streams, step: Step, report: VisorReport) -> torch.Tensor:
        """Read the routing row, choose each sample's configuration, drop the row (and its cache entries)."""
        state_h = t[:, -1]  # (B, W)
        logits = self.router(state_h)  # (B, C)
        choice = logits.argmax(-1)  # (B,)
        streams.sa.copy_(self.masks(self.configurations)[choice])
        report.routing_state, report.router_logits, report.route = state_h, logits, choice
        if step.cache is not None:
            for layer_cache in step.cache.layers[: self.sa_layers[0]]:
                layer_cache.truncate(layer_cache.length - 1)
        return t[:, :-1]

    def _joint_layer(self, layer: DecoderLayer, t: torch.Tensor, v: torch.Tensor, streams: Streams, step: Step,
                     i: int, cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full decoder layer over the joint rows, in sequence order; visual keys hidden from (and
        visual rows kept for) the samples that do not run layer i as SA."""
        sa = streams.sa[:, i, None]  # (B, 1)
        joint = step.tokens.with_keys(step.key_valid & ~(streams.visual_cols & ~sa))  # (B, Tk)
        if v.shape[1] == 0:  # a decode step: the new rows are all text, already in order
            x = t
        else:
            x = self._merge(t, v, streams, torch.empty(t.shape[0], t.shape[1] + v.shape[1], t.shape[2],
                                                       dtype=t.dtype, device=t.device))
        x = layer(x, joint.ctx, cache)  # (B, T, W)
        new_v = x.gather(1, _rows(streams.visual_idx, x))
        return x.gather(1, _rows(streams.text_idx, x)), torch.where(sa[..., None], new_v, v)

    def _cross_kv(self, i: int, v: torch.Tensor, state: VisorState | None) -> tuple[torch.Tensor, torch.Tensor]:
        """CA keys/values of layer i from the visual stream as it is there; once per request."""
        if state is not None and i in state.ca_kv:
            return state.ca_kv[i]
        if v.shape[1] == 0:
            raise LoupeError("visor needs an image: pass pixel_values (or encoded images) with the prompt")
        module = self.cross[str(i)]
        kv = module.keys_values(v.to(module.attn.q_proj.weight.dtype))
        if state is not None:
            state.ca_kv[i] = kv
        return kv

    @staticmethod
    def _merge(t: torch.Tensor, v: torch.Tensor, streams: Streams, out: torch.Tensor) -> torch.Tensor:
        """Scatter the text rows (B, Tt, W) and visual rows (B, Nv', W) back into sequence order."""
        out = out.scatter(1, _rows(streams.text_idx, t), t)
        return out.scatter(1, _rows(streams.visual_idx, v), v) if v.shape[1] else out

    # ---- routing ------------------------------------------------------------------------------------
    @torch.no_grad()
    def routing_states(self, vlm: VLM, **forward: Any) -> torch.Tensor:
        """Routing-token hidden states (B, W) for a batch of prompts (`VLM.forward` arguments),
        running only the layers before the first SA layer."""
        if not self.sa_layers:
            raise LoupeError("this visor model has no SA layers, so there is nothing to route")
        report = vlm(last_only=True, run=VisorRun(configuration="router", routing_only=True), **forward).report
        assert isinstance(report, VisorReport) and report.routing_state is not None
        return report.routing_state

    def load_router(self, state: dict[str, torch.Tensor], configurations: list[list[int]]) -> None:
        """Install a trained router; its configuration list must be this model's."""
        mine = [sorted(c) for c in self.configurations]
        theirs = [sorted(c) for c in configurations]
        if mine != theirs:
            raise LoupeError(f"the router was trained for configurations {theirs}, but this model has {mine}")
        mine_shapes = {k: tuple(v.shape) for k, v in self.router.state_dict().items()}
        their_shapes = {k: tuple(v.shape) for k, v in state.items()}
        if mine_shapes != their_shapes:
            raise LoupeError(f"the router's weights {their_shapes} do not fit this model's router {mine_shapes} "
                             "(another width or router_hidden)")
        self.router.load_state_dict({k: v.to(self.route_token.dtype) for k, v in state.items()})

    def redefine(self, configurations: list[list[int]], configuration: str | int) -> None:
        """Make this a model of other trained-for configurations (after the viable search) and
        another default mode (universal training: "sample"); the router is reset. A change of
        what the model is, saved with it - not a per-call choice (those are `VisorRun`)."""
        options = dataclasses.replace(self.options, configurations=[sorted(c) for c in configurations],
                                      configuration=configuration)
        self.validate_options(self.cfg, options)
        self.options = options
        self.configurations = options.resolved_configurations(self.cfg)
        self.reset_router()

    def reset_router(self) -> None:
        """A fresh router for the current configurations (random MLP, as after conversion)."""
        t = self.cfg.text
        router = Router(t, self.options.router_hidden or t.hidden_size, len(self.configurations))
        self.router = router.to(self.route_token.device, self.route_token.dtype)
        _init_router(self.router)

    # ---- weights ------------------------------------------------------------------------------------
    def init_from_base(self, vlm: VLM) -> None:
        for module in self.cross.values():
            module.reset()  # type: ignore[operator]
        with torch.no_grad():
            self.route_token.copy_(vlm.decoder.embed_tokens.weight.float().mean(0))  # a neutral token
        _init_router(self.router)

    # ---- cost ---------------------------------------------------------------------------------------
    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Per sample: SA layers over the joint sequence, every other layer over the text rows,
        CA layers' queries over all visual tokens, their keys/values (with the position
        convolution) once per request; the router's row and MLP when routing. A router's mix
        of configurations is `workload.mix` (fractions in configuration order)."""
        assert isinstance(options, VisorConfig)
        plan, nv = cls.visual_plan(cfg, options, workload)
        configs = options.resolved_configurations(cfg)
        mix = _mix(options, workload, len(configs))
        sa = options.resolved_sa(cfg)
        routing = options.configuration == "router" and bool(sa)
        layers = visor_layer_counts(cfg, configs, mix)  # layer -> fraction of samples running it as SA
        t, ca = cfg.text, options.resolved_ca(cfg)
        inner, w = t.num_heads * t.head_dim, t.hidden_size
        hidden = options.router_hidden or w

        def text_rows(text: int, i: int) -> int:
            return text + (1 if routing and i < sa[0] else 0)

        def llm_prefill(seq: int) -> float:
            text = seq - nv
            return sum(f * decoder_layer(t, seq, seq) + (1 - f) * decoder_layer(t, text_rows(text, i),
                                                                                  text_rows(text, i))
                       for i, f in enumerate(layers))

        def llm_decode(keys: int) -> float:
            return sum(f * decoder_layer(t, 1, keys) + (1 - f) * decoder_layer(t, 1, keys - nv) for f in layers)

        def cross(rows: int) -> float:
            return 2 * linear(rows, w, inner) + attention(rows, nv, t.num_heads, t.head_dim)

        front = plan.prefill_extra  # the visual plan's own (a front end's selection)

        def prefill_extra(seq: int) -> dict[str, float]:
            parts = {**front(seq), "cross_attention": sum(cross(text_rows(seq - nv, i)) for i in ca),
                     "cross_kv": len(ca) * (2 * linear(nv, w, inner) + 2 * nv * w * options.conv_kernel)}
            if routing:
                parts["router"] = linear(1, w, hidden) + linear(1, hidden, len(configs))
            return parts

        plan.image_tokens = nv
        plan.prefill_llm, plan.decode_llm = llm_prefill, llm_decode
        plan.image_layers = sum(layers)
        plan.prefill_extra = prefill_extra
        plan.decode_extra = lambda keys: {"cross_attention": len(ca) * cross(1)}
        plan.image_parts = ("cross_attention", "cross_kv")
        return plan

    @classmethod
    def visual_plan(cls, cfg: VLMConfig, options: VisorConfig, workload: Workload) -> tuple[CostPlan, int]:
        """The encoder's part of the plan, and Nv: LR + the k x k HR tiles (with the front end:
        each crop's VisionZip tokens, only those projected)."""
        plan, m = tiled_plan(cfg, options.resolved_hr_size(cfg))
        front = options.front_end()
        if front is None:
            return plan, cfg.tokens_per_image + m
        crops = tiled_crops(cfg, options.resolved_hr_size(cfg))
        nv, work = crops * front.kept(cfg), crops * zip_flops(cfg, front)
        plan.projector_rows, plan.prefill_extra = nv, lambda seq: {"token_selection": work}
        return plan, nv

    @classmethod
    def budgets(cls, cfg: VLMConfig, options: MethodConfig) -> list[MethodConfig]:
        """One set of options per configuration, cheapest first."""
        assert isinstance(options, VisorConfig)
        n = len(options.resolved_configurations(cfg))
        return [dataclasses.replace(options, configuration=k) for k in range(n)]

    @classmethod
    def dense_reference(cls, cfg: VLMConfig, options: MethodConfig) -> MethodConfig:
        """The same model processing all its visual tokens in every layer: hd with the same tiles."""
        assert isinstance(options, VisorConfig)
        return HDConfig(hr_size=options.resolved_hr_size(cfg), tiles=True)


def visor_layer_counts(cfg: VLMConfig, configurations: list[list[int]], mix: list[float]) -> list[float]:
    """Per layer, the fraction of samples that run it as SA under a mix of configurations."""
    out = [0.0] * cfg.text.num_layers
    for c, share in zip(configurations, mix, strict=True):
        for i in c:
            out[i] += share
    return out


def _mix(options: VisorConfig, workload: Workload, n: int) -> list[float]:
    mode = options.configuration
    if workload.mix is not None:
        if len(workload.mix) != n:
            raise LoupeError(f"a mix of {len(workload.mix)} fractions for {n} configurations")
        return list(workload.mix)
    if mode == "router":
        raise LoupeError("the cost of routed visor needs the router's mix of configurations (Workload.mix)")
    index = {"max": n - 1, "min": 0, "sample": n - 1}.get(mode, mode)  # type: ignore[arg-type]
    return [1.0 if k == index else 0.0 for k in range(n)]


def _init_router(router: Router) -> None:
    with torch.no_grad():
        router.norm.weight.fill_(1.0)
        for lin in (router.fc1, router.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            lin.bias.zero_()


def _rows(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Row index (B, R) -> gather/scatter index (B, R, W) for a (B, ., W) tensor."""
    return index[..., None].expand(-1, -1, like.shape[-1])


def all_subsets(layers: Sequence[int]) -> list[list[int]]:
    """Every subset of `layers`, by size then lexicographically."""
    return [list(c) for k in range(len(layers) + 1) for c in itertools.combinations(sorted(layers), k)]
