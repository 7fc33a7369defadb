"""Probe: does supervising the answer row's attention onto the named object teach binding?

Trains the synth-tiny LLaVA from scratch on one-turn questions of the base's training
scenes (default: the short where-questions on whole scenes), with the answer loss plus
`--lam` x a grounding loss on the answer row's attention (mean over heads, renormalised
over the image tokens) at the chosen layers, towards the patches of the named object's tag
- the probe behind `loupe.grounding` (it captures the attention with hooks, in a loop of
its own, and so stands apart from the production path). Logs the share of rows whose
attention peaks on the tag ("hit"), then scores short answers per type on unseen scenes
(`base_reading.accuracy_by_type`, seed 77) and writes JSON + markdown to --out.

    python benchmarks/grounding_probe.py --lam 1 --steps 2000 --scenes 4000
    python benchmarks/grounding_probe.py --lam 1 --dense 2000 --freeze-vit --tower /tmp/tower.safetensors
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from base_curriculum import _dense_stage, _score, first_model
from safetensors.torch import load_file, save_file

from loupe.data.batches import collate, tokenize
from loupe.data.llava import read_llava
from loupe.data.synthetic import write_dataset
from loupe.files import write_atomic, write_json
from loupe.nn.attention import row_attention, row_key_mask
from loupe.reproduce import NATIVE, SCENES
from loupe.tiny import init_vit_positions_
from loupe.train import PixelImages
from loupe.visor_train import single_turns

GRID = 8


def tag_patches(box: list[float]) -> torch.Tensor:
    """(GRID*GRID,) overlap weights of the tag box with each patch, summing to 1."""
    edges = torch.arange(GRID + 1) / GRID
    ox = (torch.minimum(edges[1:], torch.tensor(box[2])) - torch.maximum(edges[:-1], torch.tensor(box[0]))).clamp(min=0)
    oy = (torch.minimum(edges[1:], torch.tensor(box[3])) - torch.maximum(edges[:-1], torch.tensor(box[1]))).clamp(min=0)
    w = (oy[:, None] * ox[None, :]).flatten()
    return w / w.sum()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--layers", default="1,2,3")
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--types", default="where")
    p.add_argument("--formats", default="short")
    p.add_argument("--pos-scale", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-scenes", type=int, default=60)
    p.add_argument("--freeze-vit", action="store_true")
    p.add_argument("--dense", type=int, default=0, help="dense pretraining steps first (loupe.dense)")
    p.add_argument("--tower", type=Path, default=None, help="safetensors of a tower+projector to load / save")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grounding-probe"))
    p.add_argument("--name", default=None, help="file stem in --out (default: from the settings)")
    args = p.parse_args()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else []
    types, formats = args.types.split(","), args.formats.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "train", args.scenes, 0, SCENES, progress=False, splits=("train",))
        examples = read_llava(data / "train.json")
        tok, model = first_model(examples, Path(tmp) / "model", None, None)
        if args.pos_scale:
            init_vit_positions_(model, args.pos_scale)
        if args.tower is not None and args.tower.exists():
            model.load_state_dict(load_file(args.tower), strict=False)
            print(f"tower from {args.tower}", flush=True)
        elif args.dense:
            _dense_stage(model, args.dense, 4000)
            if args.tower is not None:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()
                           if k.startswith(("vision_tower", "projector"))}, args.tower)
        turns = [t for t in single_turns([e for e in examples if not e.meta.get("caption")])
                 if not t.meta.get("crop") and t.meta["type"] in types and t.meta["format"] in formats]
        samples, paths = tokenize(turns, tok, model)
        targets = torch.stack([tag_patches(t.meta["tag_box"]) if "tag_box" in t.meta else torch.zeros(GRID**2)
                               for t in turns])
        pics = PixelImages(paths, NATIVE, progress=False)
        print(f"{len(samples)} samples", flush=True)
        captured: dict[int, tuple] = {}
        for l in layers:
            model.decoder.layers[l].self_attn.register_forward_pre_hook(
                lambda mod, a, l=l: captured.__setitem__(l, (mod, a[0], a[1])))
        params = [p for n, p in model.named_parameters() if not (args.freeze_vit and n.startswith("vision_tower"))]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        warm = 50
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
        log: list[dict[str, float]] = []
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        model.train()
        for step in range(args.steps):
            idx = torch.randint(len(samples), (16,), generator=gen).tolist()
            batch = collate([samples[i] for i in idx], tok.pad_id)
            imgs = pics.model_inputs([samples[i].image for i in idx])
            out = model(batch.input_ids, imgs.pixel_values, batch.attention_mask, loss_rows=batch.loss_rows,
                        logit_rows=batch.loss_rows)
            ce = F.cross_entropy(out.logits.float(), batch.targets[batch.loss_rows], reduction="mean")
            att_loss, hit = answer_row_grounding(captured, layers, batch, targets[idx], model.cfg.image_token_id)
            loss = ce + args.lam * att_loss if layers else ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == args.steps - 1:
                log.append({"step": step, "ce": round(ce.item(), 4), "grounding": round(float(att_loss), 4),
                            "hit": round(hit, 3), "seconds": round(time.perf_counter() - start, 1)})
                print(" ".join(f"{k} {v}" for k, v in log[-1].items()), flush=True)
        model.eval()
        scores = _score(model, tok, Path(tmp) / "model" / "final", args.eval_scenes)
    name = args.name or f"{args.types.replace(',', '+')}-lam{args.lam:g}" + ("-dense-frozen" if args.freeze_vit else "")
    text = "\n".join([f"grounding probe {name}: {args.steps} steps, {args.scenes} scenes, layers {args.layers}", "",
                      "| image, question type, format | accuracy % | questions |", "|---|---|---|",
                      *(f"| {k} | {v['accuracy']:.1f} | {v['n']} |" for k, v in scores.items())])
    print(text)
    write_json(args.out / f"{name}.json", {"settings": {k: str(v) for k, v in vars(args).items()}, "log": log,
                                           "accuracy": scores})
    write_atomic(args.out / f"{name}.md", text + "\n")


def answer_row_grounding(captured: dict, layers: list[int], batch, target: torch.Tensor,
                         image_token_id: int) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the tag-patch target against the answer row's head-mean attention over
    the image tokens, averaged over `layers`; and the share of rows whose peak is on the tag."""
    rows = batch.loss_rows.float().argmax(1)  # (B,) first answer row
    has = target.sum(1) > 0
    img = (batch.input_ids == image_token_id).nonzero()[:, 1].view(batch.input_ids.shape[0], -1)  # (B, 64)
    key_valid = batch.attention_mask.bool()
    total, hits = torch.zeros(()), 0.0
    for l in layers:
        mod, x, ctx = captured[l]
        q, k, _ = mod.qkv(x, ctx.rope)
        qr = q.gather(2, rows[:, None, None, None].expand(-1, q.shape[1], 1, q.shape[3]))
        _, probs = row_attention(qr, k, None, row_key_mask(rows[:, None], key_valid, q.shape[2]))
        pimg = probs[:, :, 0].mean(1).gather(1, img)  # (B, 64)
        pimg = pimg / pimg.sum(1, keepdim=True)
        total = total + (-(target * (pimg + 1e-8).log()).sum(1))[has].mean()
        hits += float((target.gather(1, pimg.argmax(1, keepdim=True))[:, 0] > 0)[has].float().mean())
    n = max(1, len(layers))
    return total / n, hits / n


if __name__ == "__main__":
    main()
