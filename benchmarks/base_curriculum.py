"""Probe a curriculum for the built-in benchmark's base: train the synth-tiny LLaVA from
scratch through named stages, each on one slice of the base's training records, and score
it per question type on unseen crops and scenes (as `base_reading.py`).

    python benchmarks/base_curriculum.py --stages read-short:300,read:900,mix:2000
    python benchmarks/base_curriculum.py --stages read-short:300,crop-where:1500,ground:800

The probes behind `loupe.reproduce.READING` and docs/reproduce.md ("The shipped base,
measured", "What is left") ran this way, with 1000 training scenes. Prints the table and
writes curriculum.json and curriculum.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from base_reading import accuracy_by_type

from loupe.checkpoints import save_pretrained
from loupe.data.batches import tokenize
from loupe.data.llava import Example, read_llava
from loupe.data.synthetic import write_dataset
from loupe.files import write_atomic, write_json
from loupe.recipe import load_recipe, train_config
from loupe.reproduce import INIT_STD, NATIVE, READING, SCENES, dataset_tokenizer, reading_turns
from loupe.tiny import init_random_, synth_tiny_config
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
    "crop-where": _turns(lambda m: bool(m.get("crop")) and m["type"] == "where" and m["format"] == "short"),
    "ground": _turns(lambda m: not m.get("crop") and m["type"] in ("where", "colour", "shape")
                     and m["format"] == "short"),
}


def parse_stages(text: str) -> list[tuple[str, int]]:
    stages = []
    for part in text.split(","):
        name, _, steps = part.partition(":")
        if name not in STAGES or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--stages: {part!r} must be NAME:STEPS with NAME one of {list(STAGES)} and STEPS >= 1")
        stages.append((name, int(steps)))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="read-short:300,read:900,mix:2000", help="NAME:STEPS,... in order")
    parser.add_argument("--scenes", type=int, default=1000, help="training scenes (seed 0's train split)")
    parser.add_argument("--eval-scenes", type=int, default=60, help="unseen scenes scored (seed 77)")
    parser.add_argument("--out", default="benchmarks/results/base-curriculum")
    args = parser.parse_args()
    stages = parse_stages(args.stages)
    torch.manual_seed(0)
    recipe = train_config(load_recipe("synth-base"))  # the base's optimiser settings for every stage
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "train", args.scenes, 0, SCENES, progress=True, splits=("train",))
        examples = read_llava(data / "train.json")
        tok = dataset_tokenizer(examples, Path(tmp) / "model")
        model = init_random_(VLM(synth_tiny_config(tok.inner.get_vocab_size())), std=INIT_STD)
        assert isinstance(model, VLM)
        log = []
        for name, steps in stages:
            samples, paths = tokenize(STAGES[name](examples), tok, model)
            cfg = TrainConfig(**{**dataclasses.asdict(recipe), "steps": steps, "log_every": max(1, steps // 10)})
            start = time.perf_counter()
            rows = train(model, InMemory(samples, PixelImages(paths, NATIVE), tok.pad_id), cfg, desc=name)
            log.append({"stage": name, "steps": steps, "samples": len(samples), "final_loss": rows[-1]["loss"],
                        "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name}: {len(samples)} samples, {steps} steps, loss {rows[-1]['loss']:.3f}", flush=True)
        final = Path(tmp) / "model" / "final"
        save_pretrained(model, final, overwrite=True)
        (final / "tokenizer.json").write_bytes(tok.inner.to_str().encode())
        scores = accuracy_by_type(final, args.eval_scenes, 77)
    text = "\n".join([f"stages {args.stages} ({args.scenes} training scenes)", "",
                      "| image, question type, format | accuracy % | questions |", "|---|---|---|",
                      *(f"| {k} | {v['accuracy']:.1f} | {v['n']} |" for k, v in scores.items())])
    print(text)
    out = Path(args.out)
    write_json(out / "curriculum.json", {"stages": log, "scenes": args.scenes, "accuracy": scores})
    write_atomic(out / "curriculum.md", text + "\n")
    print(f"\nwritten to {out}/curriculum.json and curriculum.md")


if __name__ == "__main__":
    main()
