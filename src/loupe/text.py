"""Tokenizer (a checkpoint's `tokenizer.json` through `tokenizers`), the conversation
templates (LLaVA-1.5's vicuna_v1, OneVision's ChatML), and expansion of `<image>` into
image-token ids."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from loupe.errors import LoupeError

IMAGE_PLACEHOLDER = "<image>"
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_prompt(question: str, system: str | None = LLAVA_SYSTEM, image: bool = True) -> str:
    """LLaVA-1.5 (vicuna_v1) single-turn prompt: `<system> USER: <image>\\n{q} ASSISTANT:`."""
    head = f"{system} " if system else ""
    body = f"{IMAGE_PLACEHOLDER}\n{question}" if image and IMAGE_PLACEHOLDER not in question else question
    return f"{head}USER: {body} ASSISTANT:"


def _first_id(inner: HFTokenizer, *tokens: str) -> int | None:
    for t in tokens:
        found = inner.token_to_id(t)
        if found is not None:
            return found
    return None


def chatml_prompt(question: str, system: str | None = None, image: bool = True) -> str:
    """LLaVA-OneVision's template (its processor's `apply_chat_template` with the image first and
    `add_generation_prompt=True`): `<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n`.
    The published processor adds no system turn unless one is given."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    body = f"{IMAGE_PLACEHOLDER}\n{question}" if image and IMAGE_PLACEHOLDER not in question else question
    return f"{head}<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


# `VLMConfig.chat_template` -> the single-turn prompt of that template.
PROMPTS: dict[str, Callable[[str], str]] = {"vicuna_v1": llava_prompt, "chatml": chatml_prompt}


def prompt(template: str, question: str) -> str:
    if template not in PROMPTS:
        raise LoupeError(f"unknown chat template {template!r}; Loupe has {sorted(PROMPTS)}")
    return PROMPTS[template](question)


@dataclass
class Tokenizer:
    """`tokenizers.Tokenizer` plus what a VLM prompt needs."""

    inner: HFTokenizer
    image_token_id: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], image_token_id: int) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise LoupeError(f"no tokenizer.json in {folder}")
        inner = HFTokenizer.from_file(str(path))
        found = inner.token_to_id(IMAGE_PLACEHOLDER)
        if found != image_token_id:
            raise LoupeError(f"tokenizer {path} maps {IMAGE_PLACEHOLDER!r} to {found}, but the model's "
                             f"image_token_index is {image_token_id}")
        # LLaVA-1.5 (LLaMA): <s>, </s>, <pad>. OneVision (Qwen2): no BOS, a chat turn ends at
        # <|im_end|>, <|endoftext|> pads.
        bos = inner.token_to_id("<s>")
        eos = _first_id(inner, "</s>", "<|im_end|>")
        pad = _first_id(inner, "<pad>", "<|endoftext|>")
        return cls(inner, image_token_id, bos, eos, pad if pad is not None else (eos or 0))

    def encode(self, text: str, tokens_per_image: int | list[int] = 1, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, each `<image>` expanded to `tokens_per_image` image ids (one
        count for every image, or a count per image in order, as OneVision's vary by size).

        `<image>` is an added token, so it is split out before the model's pre-tokenizer
        runs and expanding ids afterwards equals tokenising the expanded string.
        """
        ids = self.inner.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        slots = sum(i == self.image_token_id for i in ids)
        counts = [tokens_per_image] * slots if isinstance(tokens_per_image, int) else list(tokens_per_image)
        if len(counts) != slots:
            raise LoupeError(f"the prompt holds {slots} {IMAGE_PLACEHOLDER} placeholder(s) but {len(counts)} "
                             f"image(s) were given")
        out: list[int] = []
        images = iter(counts)
        for i in ids:
            out.extend([i] * next(images) if i == self.image_token_id else [i])
        return out

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode([i for i in ids if i != self.image_token_id], skip_special_tokens=True)

    def pad_left(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to a batch: input_ids (B, T) and attention_mask (B, T)."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise LoupeError("cannot batch an empty prompt")
        t = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), t), dtype=torch.long)
        for row, s in enumerate(sequences):
            ids[row, t - len(s):] = torch.tensor(s)
            mask[row, t - len(s):] = 1
        return ids, mask
