"""The VLM: images -> tokens -> method -> decoder -> logits.

Shape legend: B batch, T new positions, Tk cached + new positions, I images,
N image tokens per image, E vision width, W text width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loupe.config import VLMConfig
from loupe.errors import LoupeError
from loupe.methods import ImageInputs, MethodConfig, Step, build_method
from loupe.methods.lowres import LowResConfig
from loupe.nn.attention import KERNELS, Kernel, decoder_mask
from loupe.nn.decoder import AttnContext, Decoder
from loupe.nn.kv_cache import DecoderCache
from loupe.nn.vit import Projector, VisionTower


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_only
    info: dict[str, Any] = field(default_factory=dict)  # method reports, e.g. selection masks


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, method: MethodConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.projector = Projector(cfg)
        self.decoder = Decoder(cfg.text)
        self.method = build_method(cfg, method or LowResConfig())
        self.kernel: Kernel = "sdpa"

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def set_kernel(self, kernel: Kernel) -> VLM:
        """Attention kernel for every attention in the model: "sdpa" (default) or "eager"."""
        if kernel not in KERNELS:
            raise LoupeError(f"unknown attention kernel {kernel!r}; choose one of {list(KERNELS)}")
        self.kernel = kernel
        return self

    # ---- images ---------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels (I, 3, S, S) -> projected tokens (I, N, W); S a multiple of the patch size."""
        self._check_pixels(pixel_values)
        feats = self.vision_tower(pixel_values, self.cfg.feature_layers, self.kernel)  # (I, 1+N, E*)
        if self.cfg.feature_strategy == "default":
            feats = feats[:, 1:]  # (I, N, E*) LLaVA drops the class token
        return self.projector(feats)  # (I, N, W)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        patch, channels = self.cfg.vision.patch_size, self.cfg.vision.num_channels
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != channels or shape[2] != shape[3] or shape[2] % patch:
            raise LoupeError(f"pixel_values of shape {shape}: expected (images, {channels}, S, S) "
                             f"with S a multiple of the patch size {patch}")
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
    ) -> VLMOutput:
        """Logits for `input_ids` (B, T); Hugging Face-style arguments.

        input_ids hold one image-token id per image feature; `attention_mask` (B, T) is 0
        at left padding. With `cache`, the call continues the cached request (prefill if
        it is empty, decode otherwise). `last_only` computes logits for the last row only.
        `loss_rows` (B, T) marks the rows whose next token is scored (methods such as
        FlexAttention treat them specially in training). `image_sizes` (I, 2) are the
        original (height, width) of each image. `images` passes features already encoded
        by `model.method.encode` (e.g. cached HR features in training) instead of pixels.
        """
        self._check_ids(input_ids)
        b, t = input_ids.shape
        new_valid = self._new_valid(attention_mask, b, t)  # (B, T)
        if images is None and pixel_values is not None:
            images = self.method.encode(self, pixel_values.to(self.dtype), image_sizes)
        image_mask = input_ids == self.cfg.image_token_id  # (B, T)
        x = self._embed(input_ids, image_mask, images)  # (B, T, W)

        positions, key_valid = self._positions(new_valid, cache)  # (B, T), (B, Tk)
        self._check_positions(positions)
        mask, causal = decoder_mask(key_valid, t)
        ctx = AttnContext(self.decoder.rope(positions, x.dtype), mask, causal, self.kernel)
        step = Step(ctx, cache, images, key_valid, image_mask, loss_rows)

        h = self.method.run_layers(self, x, step)  # (B, T, W)
        if last_only:
            h = h[:, -1:]  # (B, 1, W)
        return VLMOutput(self.decoder.logits(h), step.info)

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
        n_slots = int(image_mask.sum())
        n_feats = 0 if images is None else images.sequence.shape[0] * images.sequence.shape[1]
        if n_slots != n_feats:
            n_img = 0 if images is None else images.sequence.shape[0]
            raise LoupeError(f"image tokens and image features disagree: input_ids hold {n_slots} image tokens "
                             f"(id {self.cfg.image_token_id}) but {n_img} image(s) give {n_feats} features "
                             f"({self.method.tokens_per_image()} per image for method {self.method.name!r})")
        if images is None:
            return x
        feats = images.sequence.reshape(-1, x.shape[-1]).to(x.dtype)  # (I*N, W)
        return x.masked_scatter(image_mask[..., None], feats)

    def _positions(self, new_valid: torch.Tensor, cache: DecoderCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions (B, T) of the new rows (padding does not advance them) and the
        key-validity mask (B, Tk) over everything the attention will see."""
        start = cache.next_position if cache is not None and cache.next_position is not None else 0
        positions = (start + new_valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if cache is None:
            return positions, new_valid
        key_valid = new_valid if cache.key_valid is None else torch.cat([cache.key_valid, new_valid], dim=1)
        cache.key_valid = key_valid
        cache.next_position = positions[:, -1:] + 1  # (B, 1); left padding keeps the last row real
        return positions, key_valid

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = self.cfg.text.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            raise LoupeError(f"sequence reaches position {int(positions.max())}, beyond the model's maximum "
                             f"of {limit} positions (max_position_embeddings)")
