"""The VLM: images -> tokens -> method -> decoder -> logits.

Shape legend: B batch, T new positions, Tk cached + new positions, I images,
N image tokens per image, E vision width, W text width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from loupe.config import VisionConfig, VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.methods import ImageInputs, MethodConfig, MethodReport, RunOptions, Step, Watch, build_method
from loupe.methods.lowres import LowResConfig
from loupe.nn.attention import KERNELS, Kernel
from loupe.nn.decoder import Decoder
from loupe.nn.kv_cache import DecoderCache, Segment
from loupe.nn.tokens import RopeSpec, TokenSet
from loupe.nn.vit import Projector, SiglipTower, VisionTower
from loupe.packing import PreparedImages, build_packing

# The model family's replaceable parts, chosen by name in `VLMConfig` (see `loupe.packing`
# for the image packing).
VISION_TOWERS: dict[str, Callable[[VisionConfig], VisionTower]] = {"clip": VisionTower, "siglip": SiglipTower}
PROJECTORS: dict[str, Callable[[VLMConfig], nn.Module]] = {"mlp2x_gelu": Projector}


def _part(table: dict[str, Callable], field_name: str, value: str) -> Callable:
    if value not in table:
        raise ConfigError(f"unsupported config value {field_name}={value!r}: Loupe supports {sorted(table)}")
    return table[value]


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T, V); (B, 1, V) with last_only; (K, V) with logit_rows
    report: MethodReport = field(default_factory=MethodReport)  # what the method reports (selection, routing)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, method: MethodConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = _part(VISION_TOWERS, "vision_tower", cfg.vision_tower)(cfg.vision)
        self.projector = _part(PROJECTORS, "projector", cfg.projector)(cfg)
        self.decoder = Decoder(cfg.text)
        self.packing = build_packing(cfg)
        self.method = build_method(cfg, method or LowResConfig())
        self.kernel: Kernel = "sdpa"

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def synchronize(self) -> None:
        """Wait for the device's queued work (latency measured on CUDA must include it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_kernel(self, kernel: Kernel) -> VLM:
        """Attention kernel for every attention in the model: "sdpa" (default) or "eager"."""
        if kernel not in KERNELS:
            raise LoupeError(f"unknown attention kernel {kernel!r}; choose one of {list(KERNELS)}")
        self.kernel = kernel
        return self

    # ---- images ---------------------------------------------------------------------
    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        """PIL images -> pixel_values, image_sizes and <image> ids per image, as this model
        family and method take them (LLaVA-1.5: one square image; OneVision: AnyRes tiles)."""
        if not images:
            raise LoupeError("prepare_images needs at least one image")
        return self.packing.prepare(images, self.method)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels (I, 3, S, S) -> projected tokens (I, N, W); S a multiple of the patch size."""
        self.check_pixels(pixel_values)
        feats = self.vision_tower.image_features(pixel_values, self.cfg.feature_layers, self.cfg.feature_strategy,
                                                 self.kernel)  # (I, N, E*)
        return self.projector(feats)  # (I, N, W)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Refuse pixels the tower cannot take: (I, channels, S, S), S a patch multiple, finite."""
        patch, channels, native = self.cfg.vision.patch_size, self.cfg.vision.num_channels, self.cfg.vision.image_size
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != channels or shape[2] != shape[3] or (shape[2] % patch and shape[2] != native):
            raise LoupeError(f"pixel_values of shape {shape}: expected (images, {channels}, S, S) "
                             f"with S a multiple of the patch size {patch} (or the tower's native {native})")
        if not torch.isfinite(pixel_values).all():
            raise LoupeError("pixel_values contain NaN or infinity")

    # ---- forward --------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: DecoderCache | None = None,
        last_only: bool = False,
        loss_rows: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        images: ImageInputs | None = None,
        run: RunOptions | None = None,
        logit_rows: torch.Tensor | None = None,
        watch: Watch | None = None,
    ) -> VLMOutput:
        """Logits for `input_ids` (B, T); Hugging Face-style arguments.

        input_ids hold one image-token id per image feature; `attention_mask` (B, T) is 0
        at left padding. With `cache`, the call continues the cached request (prefill if
        it is empty, decode otherwise). `last_only` computes logits for the last row only.
        `loss_rows` (B, T) marks the rows whose next token is scored (methods such as
        FlexAttention treat them specially in training). `image_sizes` (I, 2) are the
        original (height, width) of each image. `images` passes features already encoded
        by `model.method.encode` (e.g. cached HR features in training) instead of pixels.
        `run` holds the method's per-call choices (e.g. `VisorRun`), if any. `logit_rows`
        (B, T) bool computes the LM head at those rows only, in row-major order (training
        scores a few answer rows: at OneVision's vocabulary the whole (B, T, V) would be GBs).
        `watch` asks for chosen rows' attention over the image tokens at chosen layers
        (`report.watched`; grounding supervision, `loupe.grounding`).
        """
        input_ids = input_ids.to(self.device)
        image_sizes = image_sizes.to(self.device) if image_sizes is not None else None
        self._check_ids(input_ids)
        self.method.check_run(run)
        b, t = input_ids.shape
        new_valid = self._new_valid(attention_mask, b, t)  # (B, T)
        if images is None and pixel_values is not None:
            images = self.method.encode(self, pixel_values.to(self.device, self.dtype), image_sizes)
        image_mask = input_ids == self.cfg.image_token_id  # (B, T)
        x = self._embed(input_ids, image_mask, images)  # (B, T, W)

        segment = cache.segments[0] if cache is not None else Segment(0)
        positions, key_valid = segment.extend(new_valid)  # (B, T), (B, Tk)
        self._check_positions(positions)
        rope = RopeSpec(self.cfg.text.head_dim, self.cfg.text.rope_theta, x.dtype)
        tokens = TokenSet.build(positions, key_valid, new_valid, image_mask, rope, self.kernel)
        step = Step(tokens, cache, images, None if loss_rows is None else loss_rows.to(self.device), run, watch)

        h, report = self.method.run_layers(self, x, step)  # (B, T, W)
        if logit_rows is not None:
            if tuple(logit_rows.shape) != (b, t) or last_only:
                raise LoupeError(f"logit_rows of shape {tuple(logit_rows.shape)} must be (batch, length) = {(b, t)} "
                                 "and cannot be combined with last_only")
            return VLMOutput(self.decoder.logits(h[logit_rows.to(self.device)]), report)  # (K, V)
        if last_only:
            h = h[:, -1:]  # (B, 1, W)
        return VLMOutput(self.decoder.logits(h), report)

    def new_cache(self, batch: int, capacity: int) -> DecoderCache:
        t = self.cfg.text
        return DecoderCache.allocate(t.num_layers, batch, t.num_kv_heads, capacity, t.head_dim,
                                     self.dtype, self.device)

    # ---- helpers --------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise LoupeError(f"input_ids must be an integer tensor (batch, length), got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        vocab = self.cfg.text.vocab_size
        outside = (input_ids < 0) | ((input_ids >= vocab) & (input_ids != self.cfg.image_token_id))
        if outside.any():
            raise LoupeError(f"token id {int(input_ids[outside][0])} is outside the vocabulary (size {vocab})")

    def _new_valid(self, attention_mask: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=self.device)
        if tuple(attention_mask.shape) != (b, t):
            raise LoupeError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids of shape {(b, t)}")
        return attention_mask.to(self.device).bool()

    def _embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        x = self.decoder.embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, W)
        try:
            return self.packing.pack(x, image_mask, None if images is None else images.sequence)
        except LoupeError as e:
            raise LoupeError(f"{e}, for method {self.method.name!r}") from None

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = self.cfg.text.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            raise LoupeError(f"sequence reaches position {int(positions.max())}, beyond the model's maximum "
                             f"of {limit} positions (max_position_embeddings)")
