"""Methods on LLaVA-OneVision (`image_packing="anyres"`).

Shape legend: I images, P tiles per image (overview first, zero tiles after an image's
own in a batch), s tile side (384), g tile patch grid (27), n = g*g, W text width,
N_i image i's sequence length.

OneVision's pixels are tiles, not one square image: `pixel_values` (I, P, 3, s, s) as
transformers' processor makes them (`loupe.anyres.AnyResProcessor`), with `image_sizes`
(I, 2) saying how many of the P tiles each image uses and how its grid is unpadded. The
methods here take those inputs:

- `lowres`: the overview alone, n = 729 tokens per image (the cheap end);
- `hd`: OneVision itself - the overview, then the whole AnyRes grid with its row
  newlines, every token in every decoder layer (the dense reference);
- `visor`: VISOR in the paper's own setting - that same AnyRes sequence is the visual
  stream (CA layers, per-sample SA layers, router), everything else as on LLaVA-1.5;
- `xattn`: the overview in the sequence, cross-attention in every layer to the AnyRes grid
  tokens (no newlines: they carry no content), padded and masked where a batch's images
  differ in size;
- `flexattn`: Loupe's own FlexAttention on OneVision - no paper has done this. LR = the
  overview's tokens in the sequence; HR = the AnyRes grid (H x L per image) as keys/values
  of the selected blocks. Blocks are chosen on the overview's g x g attention exactly as on
  LLaVA-1.5 and spread over each image's own grid - every cell a selected block overlaps
  (the overview and the unpadded grid both span the whole image; on a grid that is a
  multiple of the block grid this is the official nearest upsample); the HR keys' RoPE angles are the overview
  positions' angles resampled bicubically to H x L. The overview is squashed, not padded,
  so no LR cell is margin;
- `fastv`, `pdrop`, `sparsevlm`: FastV, PyramidDrop and SparseVLM over the whole AnyRes
  sequence (newlines included), each image keeping its own share of its own tokens;
- `visionzip`, `hired`: the vision-side reductions on every crop (overview and tiles), with
  Loupe's substitute for the class token SigLIP lacks (`signal="mean"`, named in their labels).

A method that has no OneVision form yet is refused by `build_method` with the list of
those that have one (`loupe.methods.base.FAMILY_METHODS`), never run on inputs it would misread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loupe.anyres import Layout, check_tiles, grid_tokens, layout, reference_size, used_tiles
from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload
from loupe.methods import selection
from loupe.methods.base import ImageFeatures, ImageInputs, Method, MethodConfig, Step, register_family
from loupe.methods.fastv import FastV, FastVConfig, with_pruned_layers
from loupe.methods.flexattn import FlexAttention, FlexAttnConfig, FlexState
from loupe.methods.hd import HDConfig
from loupe.methods.hired import HiRED, HiREDConfig, anyres_hired_plan, anyres_hired_tokens, hired_anyres
from loupe.methods.lowres import LowResConfig
from loupe.methods.pdrop import PDropConfig, PyramidDrop, with_stages
from loupe.methods.sparsevlm import SparseVLM, SparseVLMConfig, with_sparse_layers
from loupe.methods.visionzip import VisionZip, VisionZipConfig, anyres_zip_plan, anyres_zip_tokens, zip_anyres
from loupe.methods.visor import Visor, VisorConfig
from loupe.methods.xattn import XAttn, XAttnConfig
from loupe.nn.rope import Rope

if TYPE_CHECKING:
    from loupe.vlm import VLM


def encode_tiles(vlm: VLM, pixel_values: torch.Tensor, layouts: list[Layout]) -> list[torch.Tensor]:
    """Each image's projected tile features (P_i, n, W), overview first; one encoder pass over
    exactly the tiles the images use (padding tiles never run)."""
    flat, needed = used_tiles(pixel_values, layouts)
    return list(vlm.image_features(flat).split(needed))  # each (P_i, n, W)


class OneVisionMethod(Method):
    """A method on OneVision's AnyRes inputs; `tokens_for` replaces the fixed per-image count."""

    families = ("anyres",)

    @classmethod
    def validate_options(cls, cfg: VLMConfig, options: MethodConfig) -> None:
        check_no_hr_size(cls.name, options)  # the AnyRes tiles are the image, not an HR size
        options.validate(cfg)

    def image_size(self) -> int:
        return self.cfg.vision.image_size  # the tile side; the processor picks the grid

    def tokens_per_image(self) -> int:
        raise LoupeError(f"method {self.name!r} on OneVision takes a number of image tokens that depends on the "
                         "image's size: use tokens_for(height, width)")

    def tokens_label(self) -> str:
        h, w = reference_size(self.cfg)
        return f"by image size, at most {self.tokens_for(h, w)}"

    def feature_key(self) -> tuple[object, ...]:
        return ("anyres", self.name)

    @classmethod
    def hr_label(cls, cfg: VLMConfig, options: MethodConfig) -> int | None:
        return None  # the tiles are chosen per image, not by an HR size

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        raise LoupeError(f"method {self.name!r} on OneVision encodes tiles with their image sizes: call "
                         "encode(vlm, pixel_values, image_sizes)")


class WholeSequence(OneVisionMethod):
    """A OneVision form whose image tokens are the whole AnyRes sequence (overview, grid,
    newlines), as OneVision itself puts them in the decoder."""

    def tokens_for(self, height: int, width: int) -> int:
        return layout(self.cfg, height, width).tokens

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return anyres_sequence(vlm, pixel_values, image_sizes)


@register_family("anyres")
class OneVisionLowRes(OneVisionMethod):
    """The overview image alone: n tokens per image, OneVision's single-tile cost."""

    name = "lowres"
    config_class = LowResConfig

    def tokens_for(self, height: int, width: int) -> int:
        return self.cfg.vision.grid**2

    def tokens_label(self) -> str:
        return str(self.cfg.vision.grid**2)

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        check_tiles(self.cfg, pixel_values, image_sizes)
        return ImageInputs(vlm.image_features(pixel_values[:, 0]), image_sizes=image_sizes)  # (I, n, W)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        n = cfg.vision.grid**2
        return CostPlan(image_tokens=n, vision={"vision.lr": (cfg.vision.image_size, 1)}, projector_rows=n)


def check_anyres_options(options: MethodConfig) -> None:
    """`hd` on OneVision is OneVision's own AnyRes; LLaVA-HD's knobs do not apply."""
    default = HDConfig()
    bad = {k: v for k, v in options.to_dict().items() if k != "name" and v != getattr(default, k, v)}
    if bad:
        raise ConfigError(f"hd on a OneVision model is its AnyRes tiling, chosen per image from "
                          f"image_grid_pinpoints; LLaVA-HD's options {bad} do not apply")


@register_family("anyres")
class OneVisionAnyRes(WholeSequence):
    """OneVision as published: the overview, then the unpadded, downsampled tile grid with a
    newline after every row; every token in every decoder layer."""

    name = "hd"
    config_class = HDConfig

    def __init__(self, cfg: VLMConfig, options: MethodConfig) -> None:
        check_anyres_options(options)
        super().__init__(cfg, options)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        return anyres_plan(cfg, workload)

    @classmethod
    def dense_reference(cls, cfg: VLMConfig, options: MethodConfig) -> MethodConfig | None:
        return HDConfig()


@register_family("anyres")
class OneVisionVisor(WholeSequence, Visor):
    """VISOR on OneVision (the paper's setting): the visual stream is the image's whole AnyRes
    sequence (overview, grid, newlines). The streams are gathered per batch as (B, Nv, W), so
    a batch holds images of one AnyRes token count (equal sizes, or sizes that share a grid)."""

    name = "visor"
    config_class = VisorConfig

    @classmethod
    def validate_options(cls, cfg: VLMConfig, options: MethodConfig) -> None:
        assert isinstance(options, VisorConfig)
        check_no_hr_size("visor", options)
        options.validate_layers(cfg)
        options.validate_front_end(cfg)

    def tokens_for(self, height: int, width: int) -> int:
        front = self.options.front_end()  # VisionZip on every crop, as `visionzip` on OneVision
        return super().tokens_for(height, width) if front is None else anyres_zip_tokens(self.cfg, front, height,
                                                                                         width)

    def feature_key(self) -> tuple[object, ...]:
        front = self.options.front_end()
        return ("anyres", self.name) + (() if front is None else tuple(sorted(front.to_dict().items())))

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        front = self.options.front_end()
        return super().encode(vlm, pixel_values, image_sizes) if front is None else zip_anyres(
            vlm, pixel_values, image_sizes, front)

    def check_image_tokens(self, counts: torch.Tensor, images: ImageInputs) -> None:
        lengths = [int(s.shape[0]) for s in images.sequence]
        if len(lengths) != counts.numel() or counts.tolist() != lengths:
            raise LoupeError(f"visor takes exactly one image per sample; the batch holds {counts.tolist()} image "
                             f"tokens per sample for images of {lengths} AnyRes tokens")
        if len(set(lengths)) > 1:
            raise LoupeError(f"visor on OneVision batches images of one AnyRes token count (its two streams are "
                             f"gathered per batch); this batch has {lengths}: batch them by size")

    @classmethod
    def visual_plan(cls, cfg: VLMConfig, options: VisorConfig, workload: Workload) -> tuple[CostPlan, int]:
        front = options.front_end()
        plan = anyres_plan(cfg, workload) if front is None else anyres_zip_plan(cfg, front, workload)
        return plan, plan.image_tokens

    @classmethod
    def dense_reference(cls, cfg: VLMConfig, options: MethodConfig) -> MethodConfig:
        return HDConfig()  # OneVision's own AnyRes, every visual token in every layer


@register_family("anyres")
class OneVisionXAttn(OneVisionMethod, XAttn):
    """LLaVA-XAttn on OneVision: the overview's n tokens in the sequence, every decoder layer
    cross-attending to the image's AnyRes grid."""

    name = "xattn"
    config_class = XAttnConfig

    @classmethod
    def validate_options(cls, cfg: VLMConfig, options: MethodConfig) -> None:
        check_no_hr_size("xattn", options)

    def tokens_for(self, height: int, width: int) -> int:
        return self.cfg.vision.grid**2

    def tokens_label(self) -> str:
        return str(self.cfg.vision.grid**2)

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return overview_and_grid(vlm, pixel_values, image_sizes)

    @classmethod
    def hr_plan(cls, cfg: VLMConfig, options: XAttnConfig, workload: Workload) -> tuple[CostPlan, int]:
        plan = anyres_plan(cfg, workload)  # every tile encoded and projected
        plan.image_tokens = cfg.vision.grid**2  # the overview alone in the sequence
        return plan, layout(cfg, *(workload.image_size or reference_size(cfg))).grid_tokens


@register_family("anyres")
class OneVisionFlexAttention(OneVisionMethod, FlexAttention):
    """FlexAttention on OneVision (Loupe's; see the module docstring)."""

    name = "flexattn"
    config_class = FlexAttnConfig

    @classmethod
    def validate_options(cls, cfg: VLMConfig, options: MethodConfig) -> None:
        assert isinstance(options, FlexAttnConfig)
        check_no_hr_size("flexattn", options)
        options.validate_selection(cfg, cfg.vision.grid)

    def tokens_for(self, height: int, width: int) -> int:
        return self.cfg.vision.grid**2

    def tokens_label(self) -> str:
        return str(self.cfg.vision.grid**2)

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return overview_and_grid(vlm, pixel_values, image_sizes)

    def _grids(self, images: ImageInputs) -> list[tuple[int, int]]:
        assert images.image_sizes is not None
        return [layout(self.cfg, int(h), int(w)).kept for h, w in images.image_sizes.tolist()]

    def _allowed(self, images: ImageInputs, batch: int, device: torch.device) -> torch.Tensor:
        g = self.cfg.vision.grid
        return torch.ones(batch, g, g, dtype=torch.bool, device=device)  # the overview has no padding

    def _hr_rope(self, rope: Rope, cols: torch.Tensor, images: ImageInputs) -> Rope:
        """Per image: the overview positions' cos/sin (g, g) bicubically resampled to its grid (H, L),
        padded to the batch's longest grid."""
        g = self.cfg.vision.grid
        lr = rope.select(cols)  # (B, N, D)
        grids = self._grids(images)

        def up(t: torch.Tensor) -> torch.Tensor:
            rows = []
            for b, (h, w) in enumerate(grids):
                grid = t[b].float().view(g, g, -1).permute(2, 0, 1)[None]  # (1, D, g, g)
                hr = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0]  # (D, H, L)
                rows.append(hr.permute(1, 2, 0).reshape(h * w, -1).to(t.dtype))  # (H*L, D)
            return pad_rows(rows)[0]  # (B, M, D)

        return Rope(up(lr.cos), up(lr.sin))

    def _spread(self, blocks: torch.Tensor, req: FlexState) -> torch.Tensor:
        """Blocks (B, R, P, P) -> (B, R, M): the cells of each image's own H x L grid that
        overlap a selected block (`selection.spread`)."""
        b, r, p, _ = blocks.shape
        m = req.tokens
        out = torch.zeros(b, r, m, dtype=torch.bool, device=blocks.device)
        assert req.hr_grids is not None
        for i, (h, w) in enumerate(req.hr_grids):
            out[i, :, :h * w] = selection.spread(blocks[i], h, w)
        return out

    def _request(self, vlm: VLM, step: Step, batch: int) -> FlexState:
        req = super()._request(vlm, step, batch)
        if req.hr_grids is None:  # the prefill: each image's grid shape, for the rest of the request
            assert step.images is not None
            req.hr_grids = self._grids(step.images)
        return req

    @classmethod
    def hr_plan(cls, cfg: VLMConfig, options: FlexAttnConfig, workload: Workload) -> tuple[CostPlan, int]:
        plan = anyres_plan(cfg, workload)  # every tile encoded and projected
        plan.image_tokens = cfg.vision.grid**2  # the overview alone in the sequence
        return plan, layout(cfg, *(workload.image_size or reference_size(cfg))).grid_tokens


@register_family("anyres")
class OneVisionFastV(WholeSequence, FastV):
    """FastV on OneVision: OneVision's whole AnyRes sequence (newlines included: they are
    image tokens of the sequence) is what layer k - 1 ranks and layers k.. prune."""

    name = "fastv"
    config_class = FastVConfig

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, FastVConfig)
        return with_pruned_layers(anyres_plan(cfg, workload), cfg, options, workload)


@register_family("anyres")
class OneVisionPyramidDrop(WholeSequence, PyramidDrop):
    """PyramidDrop on OneVision: the whole AnyRes sequence (newlines included) is ranked and
    pruned stage by stage, each image keeping its own share."""

    name = "pdrop"
    config_class = PDropConfig

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, PDropConfig)
        return with_stages(anyres_plan(cfg, workload), cfg, options)


@register_family("anyres")
class OneVisionSparseVLM(WholeSequence, SparseVLM):
    """SparseVLM on OneVision: the whole AnyRes sequence (newlines included) is rated, pruned
    and recycled, each image's budget its preset scaled to its own token count."""

    name = "sparsevlm"
    config_class = SparseVLMConfig

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, SparseVLMConfig)
        return with_sparse_layers(anyres_plan(cfg, workload), cfg, options, workload)


@register_family("anyres")
class OneVisionVisionZip(OneVisionMethod, VisionZip):
    """VisionZip on OneVision: every crop (overview, tiles) reduced on its own with Loupe's
    substitute signal, the crops' tokens concatenated (`loupe.methods.visionzip`)."""

    name = "visionzip"
    config_class = VisionZipConfig

    def tokens_for(self, height: int, width: int) -> int:
        return anyres_zip_tokens(self.cfg, self.options, height, width)

    def feature_key(self) -> tuple[object, ...]:
        return ("anyres", *VisionZip.feature_key(self))

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return zip_anyres(vlm, pixel_values, image_sizes, self.options)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, VisionZipConfig)
        return anyres_zip_plan(cfg, options, workload)


@register_family("anyres")
class OneVisionHiRED(OneVisionMethod, HiRED):
    """HiRED on OneVision's crops: the budget split between the overview and the tiles by the
    overview's early attention (`loupe.methods.hired`)."""

    name = "hired"
    config_class = HiREDConfig

    def tokens_for(self, height: int, width: int) -> int:
        return anyres_hired_tokens(self.cfg, self.options, height, width)

    def feature_key(self) -> tuple[object, ...]:
        return ("anyres", *HiRED.feature_key(self))

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return hired_anyres(vlm, pixel_values, image_sizes, self.options)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, HiREDConfig)
        return anyres_hired_plan(cfg, options, workload)


def overview_and_grid(vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> ImageInputs:
    """The overview's tokens (I, n, W) for the sequence, and each image's AnyRes grid (no
    newlines) beside it: (I, M_max, W), padded, with its validity (I, M_max)."""
    layouts = check_tiles(vlm.cfg, pixel_values, image_sizes)
    assert image_sizes is not None
    tiles = encode_tiles(vlm, pixel_values, layouts)
    grids = [grid_tokens(f, vlm.cfg, int(h), int(w))[0].flatten(0, 1)  # (H_i * L_i, W)
             for f, (h, w) in zip(tiles, image_sizes.tolist(), strict=True)]
    hr, valid = pad_rows(grids)
    return ImageInputs(torch.stack([f[0] for f in tiles]), hr=hr, image_sizes=image_sizes, hr_valid=valid)


def check_no_hr_size(name: str, options: MethodConfig) -> None:
    hr_size = getattr(options, "hr_size", 0)
    if hr_size:
        raise ConfigError(f"{name} on a OneVision model takes its AnyRes tiles, chosen per image from "
                          f"image_grid_pinpoints; hr_size={hr_size} does not apply")


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image (M_i, W) -> (I, M_max, W) zero-padded, and (I, M_max) validity (None: all equal)."""
    m = max(r.shape[0] for r in rows)
    if all(r.shape[0] == m for r in rows):
        return torch.stack(rows), None
    out = rows[0].new_zeros(len(rows), m, rows[0].shape[-1])
    valid = torch.zeros(len(rows), m, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]], valid[i, :r.shape[0]] = r, True
    return out, valid


def anyres_sequence(vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> ImageInputs:
    """OneVision's image sequences: per image (N_i, W), the overview's n tokens, then the
    stitched grid with a newline after every row."""
    layouts = check_tiles(vlm.cfg, pixel_values, image_sizes)
    assert image_sizes is not None
    sequence = [vlm.packing.arrange(feats[0], feats, int(h), int(w))  # (N_i, W)
                for feats, (h, w) in zip(encode_tiles(vlm, pixel_values, layouts), image_sizes.tolist(), strict=True)]
    return ImageInputs(sequence, image_sizes=image_sizes)


def anyres_plan(cfg: VLMConfig, workload: Workload) -> CostPlan:
    """Every tile through the encoder and projector, the whole AnyRes sequence in the decoder
    (the newlines are a learned vector: no encoder or projector work)."""
    lay = layout(cfg, *(workload.image_size or reference_size(cfg)))
    s, n = cfg.vision.image_size, cfg.vision.grid**2
    return CostPlan(image_tokens=lay.tokens, vision={"vision.lr": (s, 1), "vision.hr": (s, lay.patches - 1)},
                    projector_rows=lay.patches * n)
