"""Probe a curriculum for the built-in benchmark's base: train the synth-tiny LLaVA from
scratch through named stages, each on one slice of the base's training records (or of
scenes of its own), and score it per question type on unseen crops and scenes (as
`base_reading.py`).

    python benchmarks/base_curriculum.py --stages read-short:400,read:900,mix:2000
    python benchmarks/base_curriculum.py --pos-scale 2 --stages where1:500,where2:500,where:1000 --score-each
    python benchmarks/base_curriculum.py --stages read-short:300,crop-where:1500,ground:800
    python benchmarks/base_curriculum.py --pos-scale 2 --dense 2000 --train projector+decoder --stages where:4000
    python benchmarks/base_curriculum.py --init base/read1/final --init-tokenizer data/tokenizer \
        --train projector+decoder --stages read-mc:3000

Stages: mix (every record), read-short / read / read-mc (the base's reading stages), crop-where (the
crops' short where-questions), where (the scenes' short where-questions), ground (where /
colour / shape, short); where, ground and mix followed by k = 1..5 train on scenes of their
own holding k named objects (`where1`: one named object beside grey distractors). With
--dense N the ViT and projector are first pretrained N steps on per-patch labels
(`loupe.dense`: name, pattern, row and column of every token), as the base's `DENSE`; with
--init the stages continue a saved model (a stage's final/ of `loupe reproduce --stage base`). The
probes behind `loupe.reproduce.READING` and docs/reproduce.md ran this way (1000-2000
training scenes). Prints the table and writes curriculum.json and curriculum.md
to --out (with --score-each, every stage's scores in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from base_reading import accuracy_by_type

from loupe.checkpoints import from_pretrained, save_pretrained
from loupe.data.batches import tokenize
from loupe.data.llava import Example, read_llava
from loupe.data.synthetic import write_dataset
from loupe.dense import DenseConfig, dense_accuracy, dense_scenes, pretrain_dense
from loupe.files import write_atomic, write_json
from loupe.recipe import load_recipe, train_config
from loupe.reproduce import INIT_STD, NATIVE, READING, SCENES, dataset_tokenizer, reading_turns
from loupe.text import Tokenizer
from loupe.tiny import init_random_, init_vit_positions_, synth_tiny_config
from loupe.train import InMemory, PixelImages, TrainConfig, train
from loupe.visor_train import single_turns
from loupe.vlm import VLM


def _turns(keep: Callable[[dict[str, Any]], bool]) -> Callable[[list[Example]], list[Example]]:
    """A stage of one-turn examples: every (non-caption) turn whose metadata `keep` accepts."""
    return lambda examples: [t for t in single_turns([e for e in examples if not e.meta.get("caption")])
                             if keep(t.meta)]


# Stage name -> the slice of the base's training records it trains on.
STAGES: dict[str, Callable[[list[Example]], list[Example]]] = {
    "mix": lambda examples: list(examples),  # everything, as the base's last stage
    "read-short": lambda examples: reading_turns(examples, READING[0]),  # the base's reading stages
    "read": lambda examples: reading_turns(examples, READING[1]),
    "read-mc": lambda examples: reading_turns(examples, ("mc",)),  # the multiple-choice form alone
    "crop-where": _turns(lambda m: bool(m.get("crop")) and m["type"] == "where" and m["format"] == "short"),
    "where": _turns(lambda m: not m.get("crop") and m["type"] == "where" and m["format"] == "short"),
    "ground": _turns(lambda m: not m.get("crop") and m["type"] in ("where", "colour", "shape")
                     and m["format"] == "short"),
}


# Stage name + k (1..5) -> the same slice of scenes of its own holding exactly k named objects
# (drawn from seed 0 with SCENES' other settings): e.g. `ground1`, a grounding stage on scenes
# of one named object, where the name need not be bound to tell it from the others.
OWN_SCENES = ("where", "ground", "mix")


def _own_scenes(name: str) -> int | None:
    base, k = name[:-1], name[-1:]
    return int(k) if base in OWN_SCENES and k.isdigit() and 1 <= int(k) <= 5 else None


def parse_stages(text: str) -> list[tuple[str, int]]:
    stages = []
    for part in text.split(","):
        name, _, steps = part.partition(":")
        if (name not in STAGES and _own_scenes(name) is None) or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--stages: {part!r} must be NAME:STEPS with NAME one of {list(STAGES)} "
                             f"(or {'/'.join(OWN_SCENES)} + 1..5 named objects per scene) and STEPS >= 1")
        stages.append((name, int(steps)))
    return stages


def stage_examples(name: str, examples: list[Example], scenes: int, folder: Path) -> list[Example]:
    """The stage's training examples: a slice of the base's records, or of scenes of its own."""
    k = _own_scenes(name)
    if k is None:
        return STAGES[name](examples)
    cfg = dataclasses.replace(SCENES, objects=(k, k))
    data = write_dataset(folder / name, scenes, 0, cfg, progress=False, splits=("train",))
    return STAGES[name[:-1]](read_llava(data / "train.json"))


def _score(model: VLM, tok: Any, folder: Path, scenes: int, stage: str = "") -> dict[str, dict[str, float | int]]:
    """Per-type accuracy on unseen benchmark scenes; after a stage on scenes of its own, also
    on unseen scenes of that kind (keys prefixed "k-object")."""
    save_pretrained(model, folder, overwrite=True)
    (folder / "tokenizer.json").write_bytes(tok.inner.to_str().encode())
    scores = accuracy_by_type(folder, scenes, 77)
    k = _own_scenes(stage)
    if k is not None:
        own = accuracy_by_type(folder, scenes, 77, dataclasses.replace(SCENES, objects=(k, k)))
        scores |= {f"{k}-object {name}": v for name, v in own.items() if name.startswith("scene")}
    return scores


def _dense_stage(model: VLM, steps: int, scenes: int) -> dict[str, Any]:
    """Dense pretraining of the ViT and projector on scenes of their own (seed 0's dense
    stream), scored on 500 more."""
    pixels, labels = dense_scenes(scenes + 500, 0, SCENES, model.cfg.vision.image_size // model.cfg.vision.patch_size)
    fit = 2 * scenes  # each scene and its crop
    start = time.perf_counter()
    losses, head = pretrain_dense(model, pixels[:fit], labels[:fit], DenseConfig(steps=steps))
    acc = dense_accuracy(model, head, pixels[fit:], labels[fit:])
    print(f"dense: {steps} steps, loss {losses[-1]:.3f}, patches read: name {acc['name']:.1f}%, "
          f"pattern {acc['pattern']:.1f}%", flush=True)
    return {"stage": "dense", "steps": steps, "samples": fit, "final_loss": losses[-1],
            "patch_accuracy": {k: round(v, 1) for k, v in acc.items()},
            "seconds": round(time.perf_counter() - start, 1)}


def first_model(examples: list[Example], folder: Path, init: Path | None,
                init_tokenizer: Path | None) -> tuple[Tokenizer, VLM]:
    """A fresh model and a tokenizer of `examples`, or the saved model `init` and its tokenizer."""
    if init is None:
        tok = dataset_tokenizer(examples, folder)
        model = init_random_(VLM(synth_tiny_config(tok.inner.get_vocab_size())), std=INIT_STD)
        assert isinstance(model, VLM)
        return tok, model
    tok = Tokenizer.from_folder(init_tokenizer or init, image_token_id=4)
    return tok, from_pretrained(init, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="read-short:300,read:900,mix:2000", help="NAME:STEPS,... in order")
    parser.add_argument("--scenes", type=int, default=1000, help="training scenes (seed 0's train split)")
    parser.add_argument("--eval-scenes", type=int, default=60, help="unseen scenes scored (seed 77)")
    parser.add_argument("--pos-scale", type=float, default=0.0,
                        help="start the ViT's positions as 2D sine-cosine codes of this per-dim RMS (0: the random "
                             "init's, as the shipped base; 2 matches the patch embedding's output at init)")
    parser.add_argument("--train", default=None, help="the parts trained, '+'-joined (default: the recipe's, "
                        "vision_tower+projector+decoder; projector+decoder keeps the ViT at its init)")
    parser.add_argument("--dense", type=int, default=0, help="first pretrain the ViT and projector this many steps "
                        "on per-patch colour-shape labels (`loupe.dense`; 0: none)")
    parser.add_argument("--dense-scenes", type=int, default=4000, help="scenes of their own for --dense")
    parser.add_argument("--score-each", action="store_true", help="also score after every stage (in the JSON)")
    parser.add_argument("--out", default="benchmarks/results/base-curriculum")
    parser.add_argument("--save", type=Path, default=None, help="also keep the trained model (and tokenizer) here")
    parser.add_argument("--init", type=Path, default=None, help="start from this saved model (a stage's final/ "
                        "or --save; its tokenizer.json, or the one in --init-tokenizer) instead of a fresh one")
    parser.add_argument("--init-tokenizer", type=Path, default=None, help="the folder of --init's tokenizer.json")
    args = parser.parse_args()
    stages = parse_stages(args.stages)
    if args.init is not None and (args.dense or args.pos_scale):
        raise SystemExit("--init starts from a trained model: --dense and --pos-scale would re-initialise it")
    torch.manual_seed(0)
    recipe = train_config(load_recipe("synth-base"))  # the base's optimiser settings for every stage
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "train", args.scenes, 0, SCENES, progress=True, splits=("train",))
        examples = read_llava(data / "train.json")
        tok, model = first_model(examples, Path(tmp) / "model", args.init, args.init_tokenizer)
        if args.pos_scale > 0:
            init_vit_positions_(model, args.pos_scale)
        log: list[dict[str, Any]] = []
        if args.dense:
            log.append(_dense_stage(model, args.dense, args.dense_scenes))
        for name, steps in stages:
            samples, paths = tokenize(stage_examples(name, examples, args.scenes, Path(tmp)), tok, model)
            parts = tuple(args.train.split("+")) if args.train else recipe.train
            cfg = TrainConfig(**{**dataclasses.asdict(recipe), "steps": steps, "log_every": max(1, steps // 10),
                                 "train": parts})
            start = time.perf_counter()
            rows = train(model, InMemory(samples, PixelImages(paths, NATIVE), tok.pad_id), cfg, desc=name)
            log.append({"stage": name, "steps": steps, "samples": len(samples), "final_loss": rows[-1]["loss"],
                        "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name}: {len(samples)} samples, {steps} steps, loss {rows[-1]['loss']:.3f}", flush=True)
            if args.score_each:
                log[-1]["accuracy"] = scores = _score(model, tok, Path(tmp) / "model" / "final", args.eval_scenes,
                                                     name)
                print(" ".join(f"{k}={v['accuracy']:.1f}" for k, v in scores.items() if "pattern" not in k or
                               k.startswith("crop")), flush=True)
        scores = log[-1].get("accuracy") or _score(model, tok, Path(tmp) / "model" / "final", args.eval_scenes)
        if args.save:
            shutil.copytree(Path(tmp) / "model" / "final", args.save, dirs_exist_ok=True)
    text = "\n".join([f"stages {args.stages} ({args.scenes} training scenes)", "",
                      "| image, question type, format | accuracy % | questions |", "|---|---|---|",
                      *(f"| {k} | {v['accuracy']:.1f} | {v['n']} |" for k, v in scores.items())])
    print(text)
    out = Path(args.out)
    write_json(out / "curriculum.json", {"stages": log, "scenes": args.scenes, "accuracy": scores,
                                         "init": str(args.init) if args.init else None})
    write_atomic(out / "curriculum.md", text + "\n")
    print(f"\nwritten to {out}/curriculum.json and curriculum.md")


if __name__ == "__main__":
    main()
