"""lmms-eval plug-in: any Loupe checkpoint and method as an lmms-eval model.

    pip install "loupe[lmms-eval]"
    lmms-eval --model loupe --model_args pretrained=DIR,method=flexattn,hr_size=1008,batch_size=8 --tasks textvqa_val

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject.toml,
`loupe.lmms_entry:manifest`), so `--model loupe` finds it. `--model_args`: `pretrained`
(the checkpoint folder), `method`, `device`, `dtype` (float32 | bfloat16 | float16),
`batch_size`; every other key is a method option. Prompts go through the model family's
chat template (`loupe.chat`), the one Loupe trains and generates with.

- `loglikelihood` returns (mean cross-entropy of the continuation's tokens, whether greedy
  decoding would produce it): lmms-eval's multiple-choice scoring takes the argmin. (lmms-eval
  0.7.1-0.7.3 pass every output through `unwrap_generation_output`, which turns these pairs
  into strings before its multiple-choice scoring unpacks them: a task that scores them must
  read them back, as tests/test_lmms_plugin.py's does.)
- `generate_until` is batched (left padding, `batch_size` requests at a time, grouped by
  their generation settings; lmms-eval's own LLaVA adapter runs one at a time), stops at
  `until` strings and `max_new_tokens`, greedy at temperature 0.
- `generate_until_multi_round` keeps one conversation per document: each round's context is
  a new user turn after the previous answers, until the task's `doc_to_text` says stop.
Loupe's models take one image per conversation; a document with several is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from loupe.chat import template_for
from loupe.checkpoints import from_pretrained
from loupe.errors import LoupeError
from loupe.generation import SamplingConfig, generate
from loupe.images import to_rgb
from loupe.text import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoupeLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, method: str | None = None, device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 8, max_new_tokens: int = 32, **options: Any) -> None:
        super().__init__()
        if dtype is not None and dtype not in DTYPES:
            raise LoupeError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
        self.model = from_pretrained(pretrained, method, dtype=DTYPES[dtype] if dtype else None, device=device,
                                     **options)
        self.tok = Tokenizer.from_folder(pretrained, self.model.cfg.image_token_id)
        self.chat = template_for(self.model.cfg)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    # ---- helpers ------------------------------------------------------------------------
    def _picture(self, doc_to_visual: Callable[[Any], Any], task: str, split: str, doc_id: int) -> Image.Image | None:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise LoupeError(f"document {doc_id} of {task}/{split} has {len(visuals)} images; Loupe's models take one "
                             "image per conversation")
        return to_rgb(visuals[0]) if visuals else None

    def _inputs(self, pictures: list[Image.Image | None]) -> tuple[Any, list[int]]:
        """Prepared images of the pictures that exist, and each request's <image> count (0 without one)."""
        real = [p for p in pictures if p is not None]
        prepared = self.model.prepare_images(real) if real else None
        counts = iter(prepared.tokens if prepared is not None else [])
        return prepared, [next(counts) if p is not None else 0 for p in pictures]

    def _prompt(self, context: str, image_tokens: int) -> list[int]:
        return self.chat.prompt_ids(context, self.tok, image_tokens, image=image_tokens > 0)

    # ---- the lmms-eval interface --------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            prepared, (n,) = self._inputs([self._picture(doc_to_visual, task, split, doc_id)])
            prompt = self._prompt(context, n)
            reply = self.tok.encode(self.chat.reply(str(continuation).strip()), add_bos=False)
            ids = torch.tensor([prompt + reply])
            rows = torch.zeros_like(ids, dtype=torch.bool)
            rows[0, len(prompt) - 1:-1] = True  # the rows predicting the continuation
            logits = self.model(ids, None if prepared is None else prepared.pixel_values, loss_rows=rows,
                                logit_rows=rows,
                                image_sizes=None if prepared is None else prepared.image_sizes).logits  # (K, V)
            target_ids = torch.tensor(reply, device=logits.device)
            loss = F.cross_entropy(logits.float(), target_ids)
            out.append((float(loss), bool((logits.argmax(-1) == target_ids).all())))
        return out

    @torch.inference_mode()
    def _answer(self, contexts: list[list[tuple[str, str]]], pictures: list[Image.Image | None],
                gen_kwargs: dict[str, Any]) -> list[str]:
        """Greedy (or sampled) answers to the last user turn of each conversation, batched."""
        prepared, counts = self._inputs(pictures)
        prompts = []
        for turns, n in zip(contexts, counts, strict=True):
            done, (question, _) = turns[:-1], turns[-1]
            ids, _ = self.chat.conversation(done, self.tok, n, image=n > 0) if done else (None, None)
            nxt = self.tok.encode(self.chat.user(question.strip(), first=False), add_bos=False) if done else None
            prompts.append(ids + nxt if done else self._prompt(question, n))  # type: ignore[operator]
        input_ids, mask = self.tok.pad_left(prompts)
        stops = [self.tok.eos_id] if self.tok.eos_id is not None else []
        sampling = SamplingConfig(int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                  temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0),
                                  top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), stop_tokens=stops)
        rows = generate(self.model, input_ids, None if prepared is None else prepared.pixel_values, mask, sampling,
                        image_sizes=None if prepared is None else prepared.image_sizes)
        until = gen_kwargs.get("until") or []
        texts = []
        for row in rows:
            text = self.tok.decode([t for t in row.tolist() if t not in stops])
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0] if stop else text
            texts.append(text.strip())
        return texts

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for k, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(k)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size_per_gpu):
                chunk = members[start:start + self.batch_size_per_gpu]
                pictures = [self._picture(args[k][2], args[k][4], args[k][5], args[k][3]) for k in chunk]
                texts = self._answer([[(args[k][0], "")] for k in chunk], pictures, dict(args[chunk[0]][1]))
                for k, text in zip(chunk, texts, strict=True):
                    results[k] = text
        return [r or "" for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            picture = self._picture(doc_to_visual, task, split, doc_id)
            turns: list[tuple[str, str]] = [(context, "")]
            answers: list[str] = []
            previous_info = None
            for round_idx in range(1, 100):
                answers.append(self._answer([turns], [picture], dict(gen_kwargs))[0])
                turns[-1] = (turns[-1][0], answers[-1])
                _, next_context, stop, _, previous_info = doc_to_text(doc, previous_output=answers,
                                                                      round_idx=round_idx,
                                                                      previous_round_info=previous_info)
                if stop:
                    break
                turns.append((next_context, ""))
            out.append(answers[-1] if len(answers) == 1 else "\n".join(answers))
        return out
