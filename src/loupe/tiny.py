"""Tiny random checkpoints built on the fly, in the Hugging Face LLaVA folder layout.

No weights can be downloaded in many places Loupe runs (CI, air-gapped boxes), so the
smoke run and the tests make their own: a small config, random weights, and a byte-level
BPE tokenizer trained in memory, written with the same `save_pretrained` as any model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loupe.checkpoints import save_pretrained
from loupe.config import TextConfig, VisionConfig, VLMConfig
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
        image_token_id=4, feature_layer=-1)


def tiny_tokenizer(vocab_size: int = 256, corpus: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE with LLaVA's special tokens at ids 0..4 (`<image>` = 4), trained on
    `corpus` (default: a few LLaVA-style sentences)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
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


def write_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0, overwrite: bool = False,
                          cfg: VLMConfig | None = None) -> Path:
    """A random tiny LLaVA folder at `path` (config.json, model.safetensors, tokenizer.json)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = cfg or tiny_config(vocab_size=tok.get_vocab_size())
    model = init_random_(VLM(cfg), std=0.05)
    save_pretrained(model, path, overwrite=overwrite)
    tok.save(str(Path(path) / "tokenizer.json"))
    return Path(path)
