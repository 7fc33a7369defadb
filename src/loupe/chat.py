"""One conversation template per model family, shared by training, evaluation and generation.

What a model is trained on is what it is later asked with: `ChatTemplate.conversation` gives
the ids of a whole (multi-turn) conversation with its scored answer tokens, and
`ChatTemplate.prompt_ids` the first turn's prompt, which is exactly the prefix of those ids
before the first answer token (`tests/test_chat.py`). `loupe generate`, `loupe eval`, the
reproduction and `loupe train` all go through it.

- LLaVA-1.5 (`vicuna_v1`, the official `conv_vicuna_v1`: sep " ", sep2 "</s>"):
      {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>
- LLaVA-OneVision (`chatml`, its processor's template; `<|im_end|>` ends a reply):
      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{q1}<|im_end|>\\n
      <|im_start|>assistant\\n{a1}<|im_end|>\\n<|im_start|>user\\n{q2}<|im_end|>\\n<|im_start|>assistant\\n{a2}<|im_end|>

Scored: each answer and the token that ends it (`</s>`, `<|im_end|>`), as LLaVA's
`preprocess_v1` and LLaVA-NeXT's `preprocess_qwen` label them. Prompts and answers are
tokenised separately (the answer with its leading space in vicuna_v1), so the first turn's
prompt ids are the same whether or not an answer follows.

The system message is the checkpoint's (`VLMConfig.system_prompt`): None means the
family's published default (LLaVA-1.5's vicuna system line; none for OneVision), "" none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from loupe.config import VLMConfig
from loupe.errors import LoupeError
from loupe.text import IMAGE_PLACEHOLDER, LLAVA_SYSTEM, Tokenizer

Turn = tuple[str, str]  # (human, assistant)


@dataclass(frozen=True)
class ChatTemplate:
    """A family's turn format, as format strings; `system` is the message in use (None: no system turn)."""

    name: str
    system: str | None
    system_turn: str  # "{system}": the text before the first user turn
    user_turn: str  # "{question}": one user turn up to where the assistant writes
    between: str  # before every user turn but the first (after the previous reply's end token)
    reply_turn: str  # "{answer}": an answer's text, without its end token
    ends_reply: str  # the token closing every answer (scored)

    # ---- text -----------------------------------------------------------------------
    def head(self) -> str:
        """Text before the first user turn."""
        return self.system_turn.format(system=self.system) if self.system else ""

    def user(self, question: str, first: bool) -> str:
        return ("" if first else self.between) + self.user_turn.format(question=question)

    def reply(self, answer: str) -> str:
        return self.reply_turn.format(answer=answer)

    def prompt(self, question: str, image: bool = True) -> str:
        """The first turn's prompt text (what `loupe generate` asks)."""
        return self.head() + self.user(image_first(question) if image else question, first=True)

    # ---- ids ------------------------------------------------------------------------
    def conversation(self, turns: Sequence[Turn], tok: Tokenizer, image_tokens: int | list[int] = 0,
                     image: bool = True) -> tuple[list[int], list[bool]]:
        """Ids of a whole conversation (`<image>` expanded to `image_tokens` ids) and which of
        them are scored answer tokens."""
        end = tok.inner.token_to_id(self.ends_reply)
        if end is None:
            raise LoupeError(f"the tokenizer has no {self.ends_reply!r} token to end answers with "
                             f"(chat template {self.name!r})")
        ids: list[int] = [tok.bos_id] if tok.bos_id is not None else []
        scored = [False] * len(ids)
        for k, (question, answer) in enumerate(turns):
            text = image_first(question) if k == 0 and image else question.strip()
            prompt = tok.encode((self.head() if k == 0 else "") + self.user(text, first=k == 0),
                                image_tokens, add_bos=False)
            reply = tok.encode(self.reply(answer.strip()), add_bos=False) + [end]
            ids += prompt + reply
            scored += [False] * len(prompt) + [True] * len(reply)
        return ids, scored

    def prompt_ids(self, question: str, tok: Tokenizer, image_tokens: int | list[int] = 0,
                   image: bool = True) -> list[int]:
        """The first turn's prompt ids, ready for generation (BOS included where the family has one)."""
        return tok.encode(self.prompt(question, image), image_tokens, add_bos=True)


def image_first(question: str) -> str:
    """`<image>\\n{question}`: the placeholder moved to the front, as LLaVA's preprocessing does."""
    rest = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}"


# `VLMConfig.chat_template` -> the family's template, with its published default system message.
FAMILIES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate("vicuna_v1", LLAVA_SYSTEM, "{system} ", "USER: {question} ASSISTANT:", "", " {answer}",
                              "</s>"),
    "chatml": ChatTemplate("chatml", None, "<|im_start|>system\n{system}<|im_end|>\n",
                           "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", "\n", "{answer}",
                           "<|im_end|>"),
}


def template_for(cfg: VLMConfig) -> ChatTemplate:
    """The conversation template of a model: its family's, with the checkpoint's system message."""
    if cfg.chat_template not in FAMILIES:
        raise LoupeError(f"unknown chat template {cfg.chat_template!r}; Loupe has {sorted(FAMILIES)}")
    family = FAMILIES[cfg.chat_template]
    system = family.system if cfg.system_prompt is None else cfg.system_prompt
    return replace(family, system=system or None)
