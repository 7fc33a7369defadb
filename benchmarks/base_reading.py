"""Does a `loupe reproduce` base read? Its accuracy per question type and answer format on
unseen native-size crops (where a tag is legible at 64 px: what the base must read on one
high-resolution tile) and on unseen whole scenes (where it is not, by design).

    python benchmarks/base_reading.py [--base src/loupe/assets/synth-base] [--scenes 100] [--seed 77]

The crops and scenes are the train split of a seed the base was not trained on (the base
is made from seed 0's), one question per record. Also: how well the image features keep
their positions, how much of their energy is not one vector shared by every token of the
image, and what the short where-questions on scenes are answered with (the named object's
cell, another named object's, or none's). Prints the table and writes
base_reading.json and base_reading.md to --out.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from loupe.checkpoints import from_pretrained
from loupe.data.batches import tokenize
from loupe.data.llava import Example, read_llava
from loupe.data.synthetic import CELLS, SynthConfig, cell, write_dataset
from loupe.evaluate import Prediction, evaluate
from loupe.files import write_atomic, write_json
from loupe.reproduce import NATIVE, SCENES, SHIPPED_BASE, verified_base
from loupe.text import Tokenizer
from loupe.tiny import position_readout_error, token_specific_share
from loupe.train import PixelImages
from loupe.visor_train import single_turns


def predict(base: Path, scenes: int, seed: int, cfg: SynthConfig = SCENES) -> tuple[list[Example], list[Prediction]]:
    """The base's greedy answers to every one-turn question on `scenes` fresh scenes (drawn with
    `cfg`: the benchmark's by default) and their crops; returns the turns and predictions."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, scenes, seed, cfg, progress=False, splits=("train",))
        turns = single_turns([ex for ex in read_llava(Path(tmp) / "train.json") if not ex.meta.get("caption")])
        tok = Tokenizer.from_folder(base, image_token_id=4)
        model = from_pretrained(base, "lowres", dtype=torch.float32)
        samples, paths = tokenize(turns, tok, model)
        return turns, evaluate(model, samples, PixelImages(paths, NATIVE, progress=False), tok).predictions


def accuracy_by_type(base: Path, scenes: int, seed: int,
                     cfg: SynthConfig = SCENES) -> dict[str, dict[str, float | int]]:
    """{"crop pattern short": {"accuracy": %, "n": questions}, ...} on `scenes` fresh scenes."""
    return by_type(predict(base, scenes, seed, cfg)[1])


def by_type(predictions: list[Prediction]) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        where = "crop" if p.meta.get("crop") else "scene"
        groups[f"{where} {p.meta['type']} {p.meta['format']}"].append(p.correct)
    return {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def where_confusion(turns: list[Example], predictions: list[Prediction]) -> dict[str, float | int]:
    """Short where-questions on whole scenes: the share answered with the named object's cell,
    with the cell of another named object of the scene (found, but not bound to the name), or
    with a cell no named object holds; and the share a uniform guess would give another
    object's cell. Cells of a scene's objects come from the tag boxes of its questions."""
    image_of = {t.id: str(t.image) for t in turns}
    cells: dict[str, set[str]] = defaultdict(set)
    for t in turns:
        if not t.meta.get("crop") and "tag_box" in t.meta:
            cells[str(t.image)].add(cell(t.meta["tag_box"]))
    asked = [p for p in predictions if not p.meta.get("crop") and p.meta["type"] == "where"
             and p.meta["format"] == "short"]
    others = [cells[image_of[p.id]] - {p.answer} for p in asked]
    right = sum(p.correct for p in asked)
    other = sum(p.output.strip() in o for p, o in zip(asked, others, strict=True))
    n = max(1, len(asked))
    return {"n": len(asked), "right": 100 * right / n, "another object's cell": 100 * other / n,
            "no named object's cell": 100 * (len(asked) - right - other) / n,
            "another object's cell, guessing": 100 * sum(len(o) for o in others) / len(CELLS) / n}


def feature_checks(base: Path, scenes: int, seed: int) -> dict[str, float]:
    """`loupe.tiny.position_readout_error` and `token_specific_share` of the base's projected
    features on fresh scenes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, scenes, seed, SCENES, progress=False, splits=("val",))
        pixels = PixelImages(sorted(Path(tmp).glob("images/*.png")), NATIVE, progress=False).pixels.float()
        model = from_pretrained(base, "lowres", dtype=torch.float32)
        with torch.no_grad():
            features = model.image_features(pixels)  # (I, N, W)
        return {"position_readout_error": position_readout_error(features),
                "token_specific_share": token_specific_share(features)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="a folder made by `loupe reproduce --stage base`")
    parser.add_argument("--scenes", type=int, default=100, help="fresh scenes (each with its two crops)")
    parser.add_argument("--seed", type=int, default=77, help="their seed (not the base's)")
    parser.add_argument("--out", default="benchmarks/results/base-reading")
    args = parser.parse_args()
    torch.manual_seed(0)
    turns, predictions = predict(verified_base(Path(args.base)), args.scenes, args.seed)
    rows, confusion = by_type(predictions), where_confusion(turns, predictions)
    checks = feature_checks(Path(args.base), 40, args.seed)
    text = "\n".join(["| image, question type, format | accuracy % | questions |", "|---|---|---|",
                      *(f"| {k} | {v['accuracy']:.1f} | {v['n']} |" for k, v in rows.items())])
    text += (f"\n\nposition read-out error of the image features: {checks['position_readout_error']:.2f} patches "
             "(2.00: none, the mean's; `loupe.tiny.position_readout_error`, 40 scenes)")
    text += (f"\n\ntheir energy not shared by every token of the image: {100 * checks['token_specific_share']:.1f}% "
             "(`loupe.tiny.token_specific_share`)")
    text += ("\n\nshort where-questions on scenes, answered with: " +
             ", ".join(f"{k} {v:.1f}%" for k, v in confusion.items() if k != "n") + f" ({confusion['n']} questions)")
    print(text)
    out = Path(args.out)
    write_json(out / "base_reading.json", {"base": args.base, "scenes": args.scenes, "seed": args.seed,
                                           "accuracy": rows, **checks,
                                           "where_confusion": confusion})
    write_atomic(out / "base_reading.md", text + "\n")
    print(f"\nwritten to {out}/base_reading.json and base_reading.md")


if __name__ == "__main__":
    main()
