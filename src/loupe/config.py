"""Model configs: plain dataclasses that round-trip through JSON.

`VLMConfig.from_hf(dict)` reads a Hugging Face LLaVA `config.json` and refuses, with a
`ConfigError` naming the field and value, anything the Loupe model would silently get
wrong (another activation, a RoPE scaling scheme, another vision tower).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from loupe.errors import ConfigError
from loupe.schema import above, at_least, build, check

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalises to [-1, 1] (the published OneVision preprocessor_config)
SIGLIP_STD = (0.5, 0.5, 0.5)
VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclass
class VisionConfig:
    """A ViT encoder. CLIP: class token, pre-layernorm, bias-free patch embedding, quick-GELU.
    SigLIP (OneVision): no class token, no pre-layernorm, patch embedding with bias, GELU-tanh."""

    hidden_size: int = field(default=1024, metadata=at_least(1))
    intermediate_size: int = field(default=4096, metadata=at_least(1))
    num_layers: int = field(default=24, metadata=at_least(1))
    num_heads: int = field(default=16, metadata=at_least(1))
    image_size: int = field(default=336, metadata=at_least(1))
    patch_size: int = field(default=14, metadata=at_least(1))
    num_channels: int = field(default=3, metadata=at_least(1))
    layer_norm_eps: float = field(default=1e-5, metadata=above(0))
    hidden_act: str = "quick_gelu"
    class_token: bool = True  # CLIP's; SigLIP has none

    def __post_init__(self) -> None:
        check(self, prefix="vision_config.")
        _require(self.hidden_act in VISION_ACTS, "vision_config.hidden_act", self.hidden_act, ", ".join(VISION_ACTS))
        # image_size need not be a multiple of the patch: the patch convolution reads floor(S / patch)
        # patches per side (SigLIP-so400m: 384 px at 14 px patches -> 27, the last 6 px unread).
        _require(self.image_size >= self.patch_size, "vision_config.image_size", self.image_size,
                 f"at least patch_size={self.patch_size}")
        _require(self.hidden_size % self.num_heads == 0, "vision_config.hidden_size", self.hidden_size,
                 f"a multiple of num_attention_heads={self.num_heads}")

    @property
    def grid(self) -> int:
        """Patches per side at the native image size (24 for CLIP-L/14-336)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """A LLaMA-style decoder: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention;
    Qwen2 is the same with `qkv_bias` (and, for the small models, tied embeddings)."""

    vocab_size: int = field(default=32064, metadata=at_least(1))
    hidden_size: int = field(default=4096, metadata=at_least(1))
    intermediate_size: int = field(default=11008, metadata=at_least(1))
    num_layers: int = field(default=32, metadata=at_least(1))
    num_heads: int = field(default=32, metadata=at_least(1))
    num_kv_heads: int = field(default=32, metadata=at_least(1))
    head_dim: int = field(default=0, metadata=at_least(0))  # 0: hidden_size // num_heads (filled in __post_init__)
    rope_theta: float = field(default=10000.0, metadata=above(0))
    rms_norm_eps: float = field(default=1e-5, metadata=above(0))
    max_position_embeddings: int = field(default=4096, metadata=at_least(1))
    attention_bias: bool = False  # bias on q, k, v and o (LLaMA's `attention_bias`)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check(self, prefix="text_config.")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        _require(self.num_heads % self.num_kv_heads == 0, "text_config.num_key_value_heads", self.num_kv_heads,
                 f"a divisor of num_attention_heads={self.num_heads}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


@dataclass
class VLMConfig:
    """A LLaVA-style VLM: vision encoder -> 2-layer MLP projector -> decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 32000
    feature_layer: int | list[int] = -2
    feature_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    projector_bias: bool = True
    projector_act: str = "gelu"
    # The model family's replaceable parts, by name (`loupe.vlm.VISION_TOWERS`, `PROJECTORS`,
    # `loupe.packing.PACKINGS`): LLaVA-1.5 is a CLIP tower, a 2-layer GELU MLP, spliced tokens.
    vision_tower: str = "clip"
    projector: str = "mlp2x_gelu"
    image_packing: str = "splice"
    chat_template: str = "vicuna_v1"  # `loupe.chat.FAMILIES`: LLaVA-1.5's; OneVision's is "chatml"
    # The system message trained with and asked with (`loupe.chat`): None is the family's
    # published default (LLaVA-1.5's vicuna line, none for OneVision), "" none at all.
    system_prompt: str | None = None
    # AnyRes (LLaVA-OneVision, `image_packing="anyres"`): the (height, width) grids an image may be
    # tiled into, and the cap on the stitched grid's size ("anyres_max_9": about 9 tiles' tokens).
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)
    vision_aspect_ratio: str = "anyres_max_9"
    # Pixel normalisation (a checkpoint's preprocessor_config.json, where it has one, overrides these).
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = build(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = build(TextConfig, self.text, "text")
        if isinstance(self.image_mean, list):
            self.image_mean = tuple(self.image_mean)
        if isinstance(self.image_std, list):
            self.image_std = tuple(self.image_std)
        check(self)
        for name, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            _require(len(values) == self.vision.num_channels and all(v > 0 or name == "image_mean" for v in values),
                     name, list(values), f"{self.vision.num_channels} values (std positive)")
        _require(self.feature_strategy in ("default", "full"), "vision_feature_select_strategy",
                 self.feature_strategy, "default or full")
        _require(self.projector_act == "gelu", "projector_hidden_act", self.projector_act, "gelu")
        for layer in self.feature_layers:
            _require(-self.vision.num_layers - 1 <= layer <= self.vision.num_layers, "vision_feature_layer",
                     layer, f"an index into the {self.vision.num_layers + 1} hidden states of the vision tower")
        if not self.vision.class_token:
            _require(self.feature_strategy == "full", "vision_feature_select_strategy", self.feature_strategy,
                     "'full' for a tower without a class token ('default' drops the class token, and SigLIP "
                     "has none: it would drop a patch)")
        if self.image_packing == "anyres":
            self._check_anyres()

    def _check_anyres(self) -> None:
        tile = self.vision.image_size
        pins = self.image_grid_pinpoints
        _require(bool(pins), "image_grid_pinpoints", pins, "a non-empty list of [height, width] grids")
        for pin in pins:
            ok = len(pin) == 2 and all(isinstance(v, int) and v > 0 and v % tile == 0 for v in pin)
            _require(ok, "image_grid_pinpoints", pin, f"[height, width] pairs of positive multiples of the tile "
                     f"size {tile} (vision_config.image_size)")
        _require(re.fullmatch(r"anyres_max_[1-9][0-9]*", self.vision_aspect_ratio) is not None,
                 "vision_aspect_ratio", self.vision_aspect_ratio, "'anyres_max_N' (N tiles' worth of tokens at most)")

    @property
    def max_tiles(self) -> int:
        """N of "anyres_max_N": the stitched grid is downsampled above ~N tiles' worth of tokens."""
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    @property
    def feature_layers(self) -> list[int]:
        return [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens one native-size image contributes (576 for LLaVA-1.5)."""
        full_cls = self.feature_strategy == "full" and self.vision.class_token
        return self.vision.grid**2 + (1 if full_cls else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        return build(cls, d, "model")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VLMConfig:
        """Read a Hugging Face `LlavaConfig` or `LlavaOnevisionConfig` dict (a llava-hf `config.json`)."""
        model_type = d.get("model_type")
        _require(model_type in HF_MODEL_TYPES, "model_type", model_type, " or ".join(HF_MODEL_TYPES))
        return HF_MODEL_TYPES[model_type](d)

    @classmethod
    def _llava_from_hf(cls, d: dict[str, Any]) -> VLMConfig:
        vision = _vision_from_hf(d.get("vision_config") or {})
        return cls(
            vision=vision,
            text=_text_from_hf(d.get("text_config") or {}),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            feature_layer=d.get("vision_feature_layer", -2),
            feature_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_bias=d.get("multimodal_projector_bias", True),
            projector_act=d.get("projector_hidden_act", "gelu"),
            vision_tower=_tower_name(vision),
        )

    @classmethod
    def _onevision_from_hf(cls, d: dict[str, Any]) -> VLMConfig:
        """LLaVA-OneVision: SigLIP + Qwen2 with AnyRes tiling. The published 0.5B sets
        `tie_word_embeddings` in its text config only (the top level says untied); transformers
        ties when either does, and so does Loupe."""
        vision = _vision_from_hf(d.get("vision_config") or {"model_type": "siglip_vision_model"})
        text = _text_from_hf(d.get("text_config") or {"model_type": "qwen2"})
        tied = d.get("tie_word_embeddings", False)
        _require(isinstance(tied, bool), "tie_word_embeddings", tied, "true or false")
        text.tie_word_embeddings = text.tie_word_embeddings or tied
        pins = d.get("image_grid_pinpoints")
        return cls(
            vision=vision, text=text,
            image_token_id=d.get("image_token_index", d.get("image_token_id", 151646)),
            feature_layer=d.get("vision_feature_layer", -1),
            feature_strategy=d.get("vision_feature_select_strategy", "full"),
            projector_bias=d.get("multimodal_projector_bias", True),
            projector_act=d.get("projector_hidden_act", "gelu"),
            vision_tower=_tower_name(vision),
            image_packing="anyres", chat_template="chatml",
            image_grid_pinpoints=[list(p) for p in pins] if pins is not None else default_pinpoints(vision.image_size),
            vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"),
            image_mean=SIGLIP_MEAN if not vision.class_token else CLIP_MEAN,
            image_std=SIGLIP_STD if not vision.class_token else CLIP_STD,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` transformers writes for this model (so HF tools can read our folders)."""
        return self._onevision_to_hf() if self.image_packing == "anyres" else self._llava_to_hf()

    def _onevision_to_hf(self) -> dict[str, Any]:
        d = self._llava_to_hf()
        d.pop("image_seq_length")
        return {**d, "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
                "image_grid_pinpoints": self.image_grid_pinpoints, "vision_aspect_ratio": self.vision_aspect_ratio}

    def _llava_to_hf(self) -> dict[str, Any]:
        v, t = self.vision, self.text
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "image_seq_length": self.tokens_per_image,
            "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": self.feature_layer,
            "vision_feature_select_strategy": self.feature_strategy,
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_config": {
                "model_type": "clip_vision_model" if v.class_token else "siglip_vision_model",
                **({} if v.class_token else {"vision_use_head": False}), "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            },
            "text_config": {
                "model_type": "qwen2" if t.qkv_bias else "llama", "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                "head_dim": t.head_dim, "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                **({"attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias} if not t.qkv_bias else {}),
                "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
                "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            },
        }


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"unsupported config value {name}={value!r}: Loupe supports {expected}")


# vision_config.model_type -> its defaults (transformers' CLIPVisionConfig / the OneVision SigLIP cut).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def _vision_from_hf(v: dict[str, Any]) -> VisionConfig:
    model_type = v.get("model_type", "clip_vision_model")
    _require(model_type in VISION_DEFAULTS, "vision_config.model_type", model_type, " or ".join(VISION_DEFAULTS))
    d = {**VISION_DEFAULTS[model_type], **v}
    return VisionConfig(
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        image_size=d["image_size"],
        patch_size=d["patch_size"],
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d["layer_norm_eps"],
        hidden_act=d["hidden_act"],
        class_token=model_type == "clip_vision_model",  # SigLIP has none (and its pooling head is never read)
    )


def _tower_name(vision: VisionConfig) -> str:
    """`loupe.vlm.VISION_TOWERS` name of a vision config read from transformers'."""
    return "clip" if vision.class_token else "siglip"


def default_pinpoints(tile: int = 384) -> list[list[int]]:
    """OneVision's 36 grids: 1..6 tiles per side (384..2304 px at 384 px tiles), as transformers' default."""
    return [[tile * r, tile * c] for r in range(1, 7) for c in range(1, 7)]


HF_MODEL_TYPES = {"llava": VLMConfig._llava_from_hf, "llava_onevision": VLMConfig._onevision_from_hf}

TEXT_MODEL_TYPES = ("llama", "qwen2")  # Qwen2 = LLaMA + q/k/v bias


def _text_from_hf(t: dict[str, Any]) -> TextConfig:
    model_type = t.get("model_type", "llama")
    _require(model_type in TEXT_MODEL_TYPES, "text_config.model_type", model_type, " or ".join(TEXT_MODEL_TYPES))
    if model_type == "qwen2":
        _require(not t.get("use_sliding_window", False), "text_config.use_sliding_window",
                 t.get("use_sliding_window"), "false (full attention in every layer)")
    _require(t.get("hidden_act", "silu") == "silu", "text_config.hidden_act", t.get("hidden_act"), "silu")
    _require(t.get("pretraining_tp", 1) == 1, "text_config.pretraining_tp", t.get("pretraining_tp"), "1")
    heads = t.get("num_attention_heads", 32)
    return TextConfig(
        vocab_size=t.get("vocab_size", 32064),
        hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 11008),
        num_layers=t.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or 0,  # 0: hidden_size // num_heads
        rope_theta=_rope_theta(t),
        rms_norm_eps=t.get("rms_norm_eps", 1e-5),
        max_position_embeddings=t.get("max_position_embeddings", 4096),
        attention_bias=t.get("attention_bias", False),
        qkv_bias=model_type == "qwen2",
        mlp_bias=t.get("mlp_bias", False),
        tie_word_embeddings=t.get("tie_word_embeddings", False),
        bos_token_id=t.get("bos_token_id", 1),
        eos_token_id=t.get("eos_token_id", 2),
        pad_token_id=t.get("pad_token_id"),
    )


def _rope_theta(t: dict[str, Any]) -> float:
    """rope_theta from either config generation: top-level (transformers 4) or `rope_parameters` (5)."""
    params = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}  # transformers 4 configs
    for source in (params, scaling):
        rope_type = source.get("rope_type") or source.get("type") or "default"
        _require(rope_type == "default", "text_config.rope_type", rope_type, "default (unscaled) RoPE")
    theta = params.get("rope_theta", t.get("rope_theta", 10000.0))
    return float(theta) if isinstance(theta, int) and not isinstance(theta, bool) else theta  # else: check() names it
