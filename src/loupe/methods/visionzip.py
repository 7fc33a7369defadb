"""`visionzip`: VisionZip (Yang et al., CVPR 2025), exact to the official code, batched.

Shape legend: C crops, N patch tokens per crop, E vision width, D vision head dim,
R patches left after the dominant ones, c contextual tokens, K = kept tokens per crop,
W text width.

In the feature layer of the vision tower (LLaVA-1.5: layer -2, the layer whose output
LLaVA reads), each crop keeps (DESIGN.md section 6):
- the class token and the `dominant - 1` patches the class token attends to most (the
  layer's class-row attention summed over heads); `dominant` counts the class token, as the
  official `visionzip(model, dominant=54, contextual=10)` does for its 64 tokens;
- `contextual` merged tokens: of the R remaining patches (in token order), every
  (R // c)-th is a target; each other patch joins the target whose head-mean key of that
  layer is most similar (cosine); a contextual token = its target + the mean of the patches
  that joined it.
Tokens keep the official order: class, dominant (token order), contextual (target order).
The projector then maps only these K tokens; the decoder is unchanged (K <image> ids per
crop). `ratio` gives the budget as a fraction of the N patches instead, split between the
two kinds in the proportion dominant : contextual. `keep_class=False`, `contextual=0` and
every patch dominant keep exactly LLaVA's tokens: the base model.

The official code reads batch item 0's attention only in places and needs eager CLIP
attention; here every crop of a batch has its own selection, the class row is computed
explicitly beside the fused kernel, and only the kept tokens are projected.

On OneVision (SigLIP, no class token) each crop - the overview and every AnyRes tile, as
the official code treats LLaVA-NeXT's sub-images - is reduced on its own with Loupe's
substitute signal (`signal="mean"`, `loupe.methods.reduction`) and the crops' tokens are
concatenated, overview first; the unpadding, downsampling and newlines of OneVision's
grid do not apply to tokens that no longer lie on a grid (Loupe's choice: no paper
defines VisionZip on OneVision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from loupe.anyres import check_tiles, layout, reference_size, used_tiles
from loupe.config import VLMConfig
from loupe.errors import ConfigError
from loupe.flops import CostPlan, Workload, linear
from loupe.methods.base import ImageFeatures, ImageInputs, Method, MethodConfig, register
from loupe.methods.highres import check_hr_size, crops
from loupe.methods.reduction import SIGNAL_LABELS, Crops, check_signal, gather, probe_crops, probe_flops, top_mask
from loupe.nn.vit import feature_layer_index

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    name: ClassVar[str] = "visionzip"
    dominant: int = 54  # tokens kept by attention per crop, the class token among them (the official count)
    contextual: int = 10  # merged tokens per crop
    ratio: float | None = None  # or: tokens kept per crop as a fraction of its N patches, split dominant:contextual
    keep_class: bool = True  # keep the class token (official; a tower without one has none to keep)
    signal: str = "class"  # class (official) | mean (Loupe's substitute where the tower has no class token)
    hr_size: int = 0  # LLaVA-1.5: 0 the native image (the paper's); >0 its LR image and k x k native tiles, each a crop

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size

    def validate(self, cfg: VLMConfig) -> None:
        if self.hr_size:
            check_hr_size(cfg, self.hr_size, tiled=True)
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a whole number of tokens, at least 0")
        if self.dominant + self.contextual < 1:
            raise ConfigError(f"dominant={self.dominant} + contextual={self.contextual} keeps no token")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio} must be in (0, 1]: the fraction of each crop's tokens kept")
        check_signal("visionzip", self.signal, cfg)
        feature_layer_index(cfg)
        self.budget(cfg)

    def budget(self, cfg: VLMConfig) -> tuple[int, int, int]:
        """(class tokens kept, dominant patches, contextual tokens) per crop."""
        n = cfg.vision.grid**2
        lead = int(self.keep_class and cfg.vision.class_token)
        if self.ratio is None:
            total, contextual = self.dominant + self.contextual, self.contextual
        else:
            total = max(1, round(self.ratio * n))
            contextual = round(total * self.contextual / (self.dominant + self.contextual))
        picked = total - contextual - lead
        if picked < 0:
            raise ConfigError(f"dominant={self.dominant} counts the class token, which is kept: it must be at least 1 "
                              "(or keep_class=false)")
        if total > n + lead:
            raise ConfigError(f"visionzip keeps {total} tokens per crop, more than the crop's {n + lead} "
                              f"({n} patches{' + the class token' if lead else ''})")
        return lead, picked, contextual

    def kept(self, cfg: VLMConfig) -> int:
        return sum(self.budget(cfg))

    def variant(self, cfg: VLMConfig) -> str:
        lead, picked, contextual = self.budget(cfg)
        parts = [f"{lead + picked}+{contextual}"]
        if not self.keep_class and cfg.vision.class_token:
            parts.append("no class token")
        if SIGNAL_LABELS[self.signal]:
            parts.append(SIGNAL_LABELS[self.signal])
        return ", ".join(parts)


def zip_crops(crops: Crops, layer: int, budget: tuple[int, int, int]) -> torch.Tensor:
    """Crops -> (C, K, E): class token, dominant patches (token order), contextual tokens."""
    lead, picked, contextual = budget
    patches = crops.patches  # (C, N, E)
    c, n = patches.shape[:2]
    dominant = top_mask(crops.scores(layer), torch.full((c,), picked, device=patches.device))  # (C, N)
    rest, keys = gather(patches, ~dominant, n - picked), gather(crops.patch_keys(layer), ~dominant, n - picked)
    return torch.cat([crops.feats[:, :lead], gather(patches, dominant, picked), merge(rest, keys, contextual)], 1)


def merge(rest: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """Contextual tokens (C, c, E) from the remaining patches (C, R, E) and their keys (C, R, D):
    strided targets, each other patch joined to its most similar target; target + joined mean."""
    r = rest.shape[1]
    if count == 0:
        return rest[:, :0]
    targets = torch.zeros(r, dtype=torch.bool, device=rest.device)
    targets[torch.arange(0, r, max(1, r // count), device=rest.device)[:count]] = True
    unit = F.normalize(keys.float(), dim=-1)  # (C, R, D) cosine metric
    similarity = unit[:, ~targets] @ unit[:, targets].transpose(1, 2)  # (C, R - c, c)
    assign = F.one_hot(similarity.argmax(-1), count).to(rest.dtype)  # (C, R - c, c)
    counts = assign.sum(1).clamp_min(1)[..., None]  # (C, c, 1)
    return rest[:, targets] + (assign.transpose(1, 2) @ rest[:, ~targets]) / counts  # (C, c, E)


def zipped_tokens(vlm: VLM, pixels: torch.Tensor, options: VisionZipConfig) -> torch.Tensor:
    """Crops (C, 3, s, s) -> their projected VisionZip tokens (C, K, W)."""
    layer = feature_layer_index(vlm.cfg)
    crops = probe_crops(vlm, pixels, (layer,), options.signal)
    return vlm.projector(zip_crops(crops, layer, options.budget(vlm.cfg)))


def zipped_tiles(vlm: VLM, pixels: torch.Tensor, options: VisionZipConfig) -> torch.Tensor:
    """HR pixels (I, 3, S, S) -> every crop's tokens (the LR image, then the k x k tiles),
    per image: (I, (1 + k*k) * K, W)."""
    zipped = zipped_tokens(vlm, crops(pixels, vlm.cfg.vision.image_size), options)  # (I * (1 + k*k), K, W)
    return zipped.view(pixels.shape[0], -1, vlm.cfg.text.hidden_size)


def zip_flops(cfg: VLMConfig, options: VisionZipConfig) -> float:
    """One crop's selection work beyond the plain encoder pass: the explicit class row, the
    cosine similarities and the merge (matrix products only, as FlopCounterMode counts them)."""
    v = cfg.vision
    n = v.grid**2
    lead, picked, contextual = options.budget(cfg)
    others = n - picked - contextual
    merging = linear(others * contextual, v.head_dim, 1) + linear(contextual * others, v.hidden_size, 1)
    return probe_flops(cfg, options.signal, n + int(cfg.vision.class_token)) + (merging if contextual else 0.0)


@register
class VisionZip(Method):
    name = "visionzip"
    config_class = VisionZipConfig
    options: VisionZipConfig

    def tokens_per_image(self) -> int:
        return tiled_crops(self.cfg, self.options.hr_size) * self.options.kept(self.cfg)

    def image_size(self) -> int:
        return self.options.hr_size or self.cfg.vision.image_size

    def feature_key(self) -> tuple[object, ...]:
        return tuple(sorted(self.options.to_dict().items()))

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        """(I, K, W); with hr_size each crop's (the LR image, then the tiles): (I, (1 + k*k) * K, W)."""
        if not self.options.hr_size:
            return ImageFeatures(zipped_tokens(vlm, pixel_values, self.options))
        return ImageFeatures(zipped_tiles(vlm, pixel_values, self.options))

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Every crop's full encoder pass and selection, then its K tokens through the projector
        and decoder."""
        assert isinstance(options, VisionZipConfig)
        n = tiled_crops(cfg, options.hr_size)
        k, work, native = n * options.kept(cfg), n * zip_flops(cfg, options), cfg.vision.image_size
        vision = {"vision.lr": (native, 1), **({"vision.hr": (native, n - 1)} if n > 1 else {})}
        return CostPlan(image_tokens=k, vision=vision, projector_rows=k,
                        prefill_extra=lambda seq: {"token_selection": work})


def tiled_crops(cfg: VLMConfig, hr_size: int) -> int:
    """Crops per image on LLaVA-1.5: 1, or with hr_size the LR image and the k x k tiles."""
    return 1 + (hr_size // cfg.vision.image_size) ** 2 if hr_size else 1


# ---- OneVision's AnyRes crops (the forms in `loupe.methods.onevision` use these) ---------------
def zip_anyres(vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
               options: VisionZipConfig) -> ImageInputs:
    """Every crop of every image (overview, tiles) reduced on its own; per image the crops'
    tokens concatenated, overview first: (P_i * K, W)."""
    flat, needed = used_tiles(pixel_values, check_tiles(vlm.cfg, pixel_values, image_sizes))
    tokens = zipped_tokens(vlm, flat, options)  # (sum P_i, K, W)
    return ImageInputs([t.flatten(0, 1) for t in tokens.split(needed)], image_sizes=image_sizes)


def anyres_zip_tokens(cfg: VLMConfig, options: VisionZipConfig, height: int, width: int) -> int:
    return layout(cfg, height, width).patches * options.kept(cfg)


def anyres_zip_plan(cfg: VLMConfig, options: VisionZipConfig, workload: Workload) -> CostPlan:
    """Every crop through the encoder and the selection, the kept tokens projected."""
    crops = layout(cfg, *(workload.image_size or reference_size(cfg))).patches
    k, s = crops * options.kept(cfg), cfg.vision.image_size
    work = crops * zip_flops(cfg, options)
    return CostPlan(image_tokens=k, vision={"vision.lr": (s, 1), "vision.hr": (s, crops - 1)}, projector_rows=k,
                    prefill_extra=lambda seq: {"token_selection": work})
