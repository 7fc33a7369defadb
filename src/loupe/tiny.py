"""Tiny random checkpoints built on the fly, in the Hugging Face LLaVA folder layout.

No weights can be downloaded in many places Loupe runs (CI, air-gapped boxes), so the
smoke run and the tests make their own: a small config, random weights, and a byte-level
BPE tokenizer trained in memory, written with the same `save_pretrained` as any model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loupe.checkpoints import save_pretrained
from loupe.config import SIGLIP_MEAN, SIGLIP_STD, TextConfig, VisionConfig, VLMConfig, default_pinpoints
from loupe.errors import LoupeError
from loupe.vlm import VLM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A red circle with a small letter inside.",
    "Describe the picture in detail. What colour is the square? Where is the triangle?",
    "The answer is blue. The answer is green. left right top bottom center one two three",
]


def tiny_config(vocab_size: int = 256, image_size: int = 56, layers: int = 2) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            image_size=image_size, patch_size=14),
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=layers,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512, bos_token_id=1,
                        eos_token_id=2, pad_token_id=3),
        image_token_id=4,
    )


def synth_tiny_config(vocab_size: int = 512) -> VLMConfig:
    """The built-in benchmark's model (`loupe reproduce`): a 4-layer ViT (64 px images,
    8 px patches: 64 tokens) and a 4-layer grouped-query decoder of width 128."""
    return VLMConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, image_size=64,
                            patch_size=8),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                        pad_token_id=3),
        image_token_id=4, feature_layer=-1, system_prompt="")  # the benchmark's conversations have no system line


CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]  # Qwen2's, OneVision's <image>
CHATML_CORPUS = [
    "<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA red circle.",
    "Describe the picture in detail. What colour is the square? Where is the triangle?",
]


def tiny_onevision_config(vocab_size: int = 300, tile: int = 42, layers: int = 2) -> VLMConfig:
    """A tiny LLaVA-OneVision: SigLIP tiles of `tile` px (3 x 3 patches of 14 = 9 tokens), a
    Qwen2 decoder (q/k/v bias, tied embeddings), OneVision's 36 pinpoints at that tile size
    and its anyres_max_9 cap, `<image>` = 3 as in `tiny_chatml_tokenizer`."""
    return VLMConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=tile,
                            patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", class_token=False),
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                        num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=2048,
                        qkv_bias=True, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0),
        image_token_id=3, feature_layer=-1, feature_strategy="full", vision_tower="siglip", image_packing="anyres",
        chat_template="chatml", image_grid_pinpoints=default_pinpoints(tile), image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD)


def tiny_chatml_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE with Qwen2's special tokens and OneVision's `<image>` at ids 0..3."""
    return tiny_tokenizer(vocab_size, CHATML_CORPUS, CHATML_SPECIAL_TOKENS)


def tiny_tokenizer(vocab_size: int = 256, corpus: list[str] | None = None,
                   special_tokens: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE with LLaVA's special tokens at ids 0..4 (`<image>` = 4) or `special_tokens`,
    trained on `corpus` (default: a few LLaVA-style sentences)."""
    specials = special_tokens or SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or CORPUS, trainer)
    return tok


@torch.no_grad()
def init_random_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights in place: matrices N(0, std), norm scales 1, the rest (biases) 0."""
    for name, p in module.named_parameters():
        if p.dim() > 1:
            p.normal_(0, std)
        else:
            p.fill_(1.0 if "norm" in name else 0.0)
    return module


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sine-cosine position codes (MAE's), raster order, per-dim RMS 1:
    the first half of the channels encodes the row, the second the column."""
    if dim < 4 or dim % 4:
        raise LoupeError(f"sine-cosine positions of width {dim}: the width must be a positive multiple of 4 "
                         "(a sine and a cosine per frequency, for the row and for the column)")
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:  # (grid*grid,) -> (grid*grid, dim/2)
        angle = pos.flatten().double()[:, None] * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return (torch.cat([code(rows), code(cols)], dim=1) * 2**0.5).float()


def init_vit_positions_(model: torch.nn.Module, scale: float) -> None:
    """The vision tower's patch position embeddings as 2D sine-cosine codes of per-dim RMS
    `scale` (the class position, if any, keeps its weights).

    Why a from-scratch model may need it: with `init_random_` the patch embedding's output is
    ~20x the position embedding's (std 0.1 weights over 3*8*8 normalised pixels, against std
    0.1 positions) and the pre-norm washes the position out; the shipped synth base, trained
    that way, carries none (a linear read-out of each token's row and column from its image
    features does no better than the mean). `scale` 2 matches the patch embedding's output at
    init. The shipped base does not use it yet: a base remade with it and a grounding stage
    read worse and grounded no better (docs/reproduce.md, "What is left")."""
    emb = model.vision_tower.embeddings.position_embedding.weight  # (N or 1+N, E)
    grid = math.isqrt(emb.shape[0])
    codes = sincos_positions(grid, emb.shape[1]) * scale  # (P*P, E)
    with torch.no_grad():
        emb[emb.shape[0] - grid * grid:] = codes.to(emb.dtype)


def position_readout_error(features: torch.Tensor) -> float:
    """How well image features keep their positions: the mean absolute error, in patches, of
    a least-squares linear read-out of each token's row and column from its features (B, N, D),
    fitted on the first 3/4 of the images and scored on the rest. The mean's error, 2.0 on an
    8x8 grid, is what features without positions give."""
    b, n, d = features.shape  # (B, N, D)
    grid = math.isqrt(n)
    x = torch.cat([features.reshape(-1, d).float(), torch.ones(b * n, 1)], dim=1)  # (B*N, D+1)
    idx = torch.arange(n).repeat(b)
    y = torch.stack([idx // grid, idx % grid], dim=1).float()  # (B*N, 2)
    fit = (3 * b // 4) * n
    w = torch.linalg.lstsq(x[:fit], y[:fit]).solution
    return (x[fit:] @ w - y[fit:]).abs().mean().item()


def token_specific_share(features: torch.Tensor) -> float:
    """The share of the energy of image features (B, N, D) that is not the per-image mean over
    its tokens: 0 when every token of an image is the same vector (the decoder can pool such
    an image but not look anything up in it), near 1 when tokens differ as much as they weigh."""
    x = features.float()
    return ((x - x.mean(1, keepdim=True)).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30)).item()


def write_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0, overwrite: bool = False,
                          cfg: VLMConfig | None = None, onevision: bool = False) -> Path:
    """A random tiny LLaVA (or, with `onevision`, LLaVA-OneVision) folder at `path`
    (config.json, model.safetensors, tokenizer.json)."""
    torch.manual_seed(seed)
    tok = tiny_chatml_tokenizer() if onevision else tiny_tokenizer()
    default = tiny_onevision_config if onevision else tiny_config
    cfg = cfg or default(vocab_size=tok.get_vocab_size())
    model = init_random_(VLM(cfg), std=0.05)
    save_pretrained(model, path, overwrite=overwrite)
    tok.save(str(Path(path) / "tokenizer.json"))
    return Path(path)
