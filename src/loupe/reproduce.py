"""`loupe reproduce`: the FlexAttention paper's central table and selection ablation, at
laptop scale, on the built-in synthetic benchmark - every method trained here, on CPU.

Protocol (the paper's, scaled down):
1. Generate the benchmark (`loupe.data.synthetic`) from the seed.
2. The base: a low-resolution LLaVA of the `synth-tiny` shapes trained from scratch, first
   to read (the pattern questions on native-size crops, where tags are large, as CLIP has
   seen close-ups; `READING`), then on the whole mix: whole scenes at the native 64 px,
   the crops and captions (the grounding questions teach the answer row to look at the
   named object). Everything is trained. As the paper
   starts from a pretrained LLaVA, the run starts from the base shipped in the package
   (`loupe/assets/synth-base`, made by `loupe reproduce --stage base`, its command, time
   and machine in its MANIFEST.json, every file verified by SHA-256 at load);
   `--from-scratch` trains it inside the run instead.
3. Fine-tune every method from that same base with the same data (whole scenes only),
   steps and schedule; the vision encoder and projector frozen, so their features are
   computed once per image and shared between methods.
4. Evaluate on the held-out test split: accuracy on easy / hard questions, on small /
   large objects (hard questions), FLOPs per sample from `loupe.cost` with the selection
   fractions measured in this run, and prefill latency per sample (batch 1, from pixels).

Outputs in --out: results.json, results.md (the table), results.png (accuracy against FLOPs),
overlays/ (where FlexAttention looked, per selection strategy), the dataset, the base
checkpoint and each run's log and metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loupe import viz
from loupe.checkpoints import from_pretrained
from loupe.config import VLMConfig
from loupe.cost import estimate
from loupe.data.batches import Sample, prompt_ids, tokenize
from loupe.data.llava import Example, read_llava
from loupe.data.synthetic import SynthConfig, write_dataset
from loupe.dense import DenseConfig, dense_scenes, pretrain_dense
from loupe.errors import LoupeError
from loupe.evaluate import EvalResult, RunFor, evaluate, prefill_latency, tag_boxes
from loupe.files import write_atomic, write_json
from loupe.flops import Workload
from loupe.grounding import BOX_KEY
from loupe.methods import RunOptions, method_options
from loupe.methods.flexattn import FlexRun
from loupe.methods.visor import VisorRun
from loupe.recipe import load_recipe, train_config
from loupe.text import Tokenizer
from loupe.tiny import init_random_, init_vit_positions_, synth_tiny_config, tiny_tokenizer
from loupe.train import FeatureImages, FeatureStore, InMemory, PixelImages, TrainConfig, train
from loupe.visor_train import fit_router, routing_states, score_table, single_turns, universal_setup, visor_method
from loupe.vlm import VLM

NATIVE = 64  # the synth-tiny model's native image side
# 4 decoder layers: layers 2-3 hierarchical, the first selection made from layer 1's
# attention (layer 0's last row has not read the question yet). 2x2 LR tokens per block;
# threshold 128 instead of the official 48: this small model's attention is flatter than
# LLaVA's, and 48 selects ~70% of the HR tokens where the paper selects ~10%.
FLEX = {"first_layer": 2, "pool": 4, "threshold": 128.0}
# VISOR on 4 layers: L/3 rounds to one CA and one SA layer, which leaves a single budget to
# route to; CA layers 0 and 2 and SA layers 1 and 3 keep the paper's alternation and give
# 4 subsets (0, 1 or 2 SA layers), the routing token read after layer 0 (CA: it has seen the image).
VISOR = {"hr_size": 3 * NATIVE, "ca_layers": [0, 2], "sa_layers": [1, 3]}
SCENES = SynthConfig(native=NATIVE)
# The token-reduction peers, training-free, on the fine-tuned `hd` model's own visual tokens
# (the LR image + the 3 x 3 tiles: what VISOR keeps out of the text stream), each with one
# knob x in (0, 1] - the share of the visual tokens it keeps - set per row to the largest x
# whose LLM prefill FLOPs fit a target (VISOR's smallest budget's, FlexAttention's). The
# knob shapes follow each method's defaults: SparseVLM's "retain 192" proportions over its
# three pruning layers, FastV at K=2, PyramidDrop at its default stages.
HD_TOKENS = (NATIVE // 8) ** 2 + (3 * NATIVE // 8) ** 2  # 64 LR + 576 HR visual tokens of the synth-tiny model
Knob = Callable[[float], dict[str, Any]]
REDUCTIONS: dict[str, Knob] = {
    "fastv": lambda x: {"keep": max(1, round(x * HD_TOKENS))},
    "pdrop": lambda x: {"ratio": x},
    "sparsevlm": lambda x: {"ratios": [x, x * 200 / 300, x * 110 / 300]},
    "visionzip": lambda x: {"ratio": x},
    "hired": lambda x: {"rate": x},
}


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: a label, a method and its options."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False  # random / center selection at the attnmap run's measured fraction
    oracle: bool = False  # also assess the trained model with oracle selection at its own measured fraction
    resolution: bool = False  # the resolution ablation: run only when asked (`--resolutions`)


RUNS = (
    Run("lowres", "lowres"),
    Run("hd", "hd", {"hr_size": 3 * NATIVE, "tiles": True}),
    Run("xattn", "xattn", {"hr_size": 3 * NATIVE}),
    Run("flexattn", "flexattn", {"hr_size": 3 * NATIVE, **FLEX}, oracle=True),
    Run("flexattn-random", "flexattn", {"hr_size": 3 * NATIVE, "strategy": "random", **FLEX}, ablation=True),
    Run("flexattn-center", "flexattn", {"hr_size": 3 * NATIVE, "strategy": "center", **FLEX}, ablation=True),
    Run("flexattn@2x", "flexattn", {"hr_size": 2 * NATIVE, **FLEX}, resolution=True),
    Run("flexattn@4x", "flexattn", {"hr_size": 4 * NATIVE, **FLEX}, resolution=True),
)


@dataclass(frozen=True)
class Plan:
    scenes: int  # training scenes (val n/10, test n/5)
    base: TrainConfig
    finetune: TrainConfig
    latency_samples: int
    router_scenes: int  # training scenes whose questions label and train VISOR's router
    base_scenes: int  # the base's training scenes (each with its crops)
    # The base's reading stages, before `base` (see `READING`): one TrainConfig per entry of READING.
    reading: tuple[TrainConfig, ...] = ()
    # The vision tower's dense pretraining, before everything (`loupe.dense`; see `DENSE`), on
    # `dense_scenes` scenes of its own, each with one crop; None: none.
    dense: DenseConfig | None = None
    dense_scenes: int = 0


# The base's curriculum, LLaVA's two stages in miniature: first it learns to read, then to
# follow the whole instruction mix (`base`). Trained on the mix alone from scratch, the model
# never reads a tag: after 8000 steps it answered 20-28% of the pattern questions on its own
# training crops (chance 25%), though each crop holds one legible tag. On the crops' pattern
# questions alone, as one-turn examples with short answers, it reads unseen crops at 93% within
# 400 steps, and it keeps reading through the mix (probe on the VM, 1000 scenes). The
# multiple-choice form comes second: trained with it from the start it reads slower (65% after
# 600 steps) - the letter is learnt once the pattern is read. Each entry: the answer formats
# of one reading stage.
READING: tuple[tuple[str, ...], ...] = (("short",), ("short", "mc"))

# The answer formats whose turns the mix grounds (`loupe.grounding`; the recipe's `grounding`
# weight and layers): short answers only. Grounding every turn erased the multiple-choice
# letter the reading stages had taught (the crops' pattern questions in that form fell from
# 94.1% to 24.5%, chance 25%; `benchmarks/base_reading.py`), and in a reading stage it kept the
# letter from being learnt at all: the row predicting the letter must find it among the
# options in the text. The other turns keep their boxes for evaluation (tag hits, oracle).
GROUNDED_FORMATS: tuple[str, ...] = ("short",)

# A from-scratch tower's dense pretraining (`loupe.dense`), as LLaVA starts from CLIP and keeps
# it frozen: every token of a scene (and of a crop at one HR tile's scale) learns the
# colour-shape name of the object covering it, the pattern of the tag covering it (crops only:
# at 64 px every tag is the same blob) and its row and column; the later stages then train the
# projector and decoder on the frozen tower. Why: trained only through the decoder's answers,
# the shipped base's image tokens are 99.9% one vector shared by every token of the image
# (`loupe.tiny.token_specific_share` 0.1% after the projector), so the decoder can pool an
# image but not look anything up in it. After this stage each token reads its name at 95% and
# its pattern at 96% (held-out patches), the share is 59%, and the reading stages read as well
# on the frozen tower. A base made so (`loupe reproduce --stage base --dense-tower`) answers
# short questions that need one lookup (colour of the only square, shape of the only red
# object, where in a crop) far better than the shipped one, but did not learn the
# multiple-choice letter; it is not the shipped recipe (docs/reproduce.md, "What is left").
DENSE = DenseConfig(steps=2000, batch_size=32)
QUICK_DENSE = DenseConfig(steps=10, batch_size=8, warmup=2)  # `--quick --dense-tower`: a smoke run of it
FROZEN_TOWER = ("projector", "decoder")  # what the base's later stages train after DENSE
DENSE_POSITIONS = 2.0  # the tower's positions start as 2D sine-cosine codes at this scale (`init_vit_positions_`)


# The full run's training settings are the shipped recipes `loupe train --recipe` reads too.
FULL = Plan(1000, train_config(load_recipe("synth-base")), train_config(load_recipe("synth-finetune")),
            latency_samples=16, router_scenes=300, base_scenes=4000,
            reading=tuple(train_config(load_recipe(f"synth-base-read{k}")) for k in range(len(READING))),
            dense=None, dense_scenes=0)  # the shipped recipe; `--dense-tower`: with_dense_tower(FULL)
QUICK = Plan(60, TrainConfig(steps=30, batch_size=8, lr=1e-3, warmup=5,
                             train=("vision_tower", "projector", "decoder"), log_every=10),
             TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup=2, train=("decoder", "method"), log_every=3),
             latency_samples=3, router_scenes=12, base_scenes=60,
             reading=(TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup=2, train=("vision_tower", "projector",
                                                                                  "decoder"), log_every=5),) * 2)


def with_dense_tower(plan: Plan, dense: DenseConfig = DENSE) -> Plan:
    """`plan` with the tower pretrained by `dense` (on as many scenes as the base's own), then
    frozen through the reading stages and the mix (`loupe reproduce --dense-tower`)."""
    frozen = {"train": FROZEN_TOWER}
    return replace(plan, dense=dense, dense_scenes=plan.base_scenes,
                   base=replace(plan.base, **frozen), reading=tuple(replace(c, **frozen) for c in plan.reading))


INIT_STD = 0.1  # about 1/sqrt(width 128): with 0.02 the from-scratch model never starts using the image

OWNED = ("data", "base", "runs", "overlays", "results.json", "results.md", "results.png")


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding results needs --overwrite, which clears them."""
    if out.exists() and not out.is_dir():
        raise LoupeError(f"--out {out} exists and is not a folder")
    held = [name for name in OWNED if (out / name).exists()]
    if held and not overwrite:
        raise LoupeError(f"{out} already holds results of a run ({', '.join(held)}); pass --overwrite to replace "
                         "them, or choose another --out")
    for name in held:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def dataset_tokenizer(examples: Sequence[Example], folder: Path) -> Tokenizer:
    """A BPE trained on the benchmark's own conversations (every word one token or two)."""
    corpus = [f"USER: {q} ASSISTANT: {a}" for ex in examples for q, a in ex.turns]
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(512, corpus).save(str(folder / "tokenizer.json"))
    return Tokenizer.from_folder(folder, image_token_id=4)


def reading_turns(examples: Sequence[Example], formats: Sequence[str]) -> list[Example]:
    """Every pattern question on a crop whose answer format is in `formats`, as its own one-turn
    example (a crop's tags are legible at the native size: what a reading stage trains on)."""
    crops = [ex for ex in examples if ex.meta.get("crop") and not ex.meta.get("caption")]
    return [t for t in single_turns(crops) if t.meta.get("type") == "pattern" and t.meta.get("format") in formats]


def grounded_formats(examples: Sequence[Example], formats: Sequence[str]) -> list[Example]:
    """`examples` whose turns keep their grounding box (`BOX_KEY`) only where the turn's answer
    format is in `formats` (copies: the examples given are not changed)."""
    def kept(meta: dict[str, Any]) -> dict[str, Any]:
        return meta if meta.get("format") in formats else {k: v for k, v in meta.items() if k != BOX_KEY}

    out = []
    for ex in examples:
        per_turn = ex.meta.get("turns")
        meta = {**ex.meta, "turns": [kept(t) for t in per_turn]} if isinstance(per_turn, list) else kept(ex.meta)
        out.append(replace(ex, meta=meta))
    return out


def train_base(out: Path, examples: Sequence[Example], tok: Tokenizer, plan: Plan, seed: int,
               progress: bool) -> Path:
    """The base from scratch: the tower's dense pretraining (`DENSE`), the reading stages
    (`READING`), then the whole mix; each stage in its own folder of `out` (its log and final
    weights), the last one's final/ is the base."""
    torch.manual_seed(seed)
    model = init_random_(VLM(synth_tiny_config(tok.inner.get_vocab_size())), std=INIT_STD)
    assert isinstance(model, VLM)
    if plan.dense is not None:
        dense_stage(model, plan.dense, plan.dense_scenes, seed, out / "dense", progress)
    stages = [(f"read{k}", reading_turns(examples, formats), cfg)
              for k, (formats, cfg) in enumerate(zip(READING, plan.reading, strict=True))]
    for name, data, cfg in [*stages, ("", grounded_formats(examples, GROUNDED_FORMATS), plan.base)]:
        samples, paths = tokenize(data, tok, model)
        images = PixelImages(paths, NATIVE, progress)
        cfg = TrainConfig(**{**asdict(cfg), "seed": seed})
        train(model, InMemory(samples, images, tok.pad_id), cfg, out / name if name else out, progress=progress,
              desc=f"base {name or 'mix'}")
    (out / "final" / "tokenizer.json").write_bytes(tok.inner.to_str().encode())
    return out / "final"


def dense_stage(model: VLM, cfg: DenseConfig, scenes: int, seed: int, out: Path, progress: bool) -> None:
    """`DENSE`: the tower's positions as sine-cosine codes, then dense pretraining on `scenes`
    scenes of its own (and a crop of each); its loss per step goes to `out`/train_log.jsonl."""
    init_vit_positions_(model, DENSE_POSITIONS)
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    pixels, labels = dense_scenes(scenes, seed, SCENES, grid, progress=progress)
    losses, _ = pretrain_dense(model, pixels, labels, cfg, seed, progress)
    lines = [json.dumps({"step": k + 1, "loss": loss}) for k, loss in enumerate(losses)
             if (k + 1) % 25 == 0 or k + 1 == len(losses)]
    write_atomic(out / "train_log.jsonl", "\n".join(lines) + "\n")


# ---- the shipped base ------------------------------------------------------------------------
SHIPPED_BASE = Path(__file__).parent / "assets" / "synth-base"
MANIFEST = "MANIFEST.json"
STAGES = ("all", "base")  # the whole reproduction; only the base (what the package ships)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, provenance: dict[str, Any]) -> Path:
    """`folder`/MANIFEST.json: how the base was made and the SHA-256 of every file in it."""
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return write_json(folder / MANIFEST, {**provenance, "files": files})


def verified_base(folder: Path) -> Path:
    """`folder` if every file its manifest lists is there with the recorded SHA-256; a clear
    error naming the file otherwise (never a silent retrain)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise LoupeError(f"no base at {folder} (missing {MANIFEST}); make one with `loupe reproduce --stage base`, "
                         "or pass --from-scratch to train it inside the run")
    files = json.loads(manifest.read_text()).get("files") or {}
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name not in files:
            raise LoupeError(f"{manifest} lists no {name}; the base folder is incomplete")
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise LoupeError(f"{path} is missing (listed in {manifest})")
        got = sha256(path)
        if got != want:
            raise LoupeError(f"{path}: SHA-256 {got[:16]}... does not match {want[:16]}... in {manifest}; the base "
                             "is damaged or was changed - restore it (git checkout), make it again with `loupe "
                             "reproduce --stage base`, or pass --from-scratch to train one inside the run")
    return folder


def make_base(out: Path, train_ex: Sequence[Example], val_ex: Sequence[Example], tok: Tokenizer, plan: Plan,
              seed: int, quick: bool, progress: bool) -> Path:
    """Train the base in `out`/base and write its manifest: command, time, machine, its
    validation accuracy and the hash of every file."""
    start = time.perf_counter()
    final = train_base(out / "base", train_ex, tok, plan, seed, progress)
    seconds = time.perf_counter() - start
    model = from_pretrained(final, "lowres", dtype=torch.float32)
    samples, paths = tokenize(val_ex, tok, model)
    summary = evaluate(model, samples, PixelImages(paths, NATIVE, progress=False), tok, progress=progress).summary()
    command = f"loupe reproduce --stage base --seed {seed}" + (" --quick" if quick else "")
    if plan.base.steps != (QUICK if quick else FULL).base.steps:
        command += f" --base-steps {plan.base.steps}"
    if plan.dense is not None and (QUICK if quick else FULL).dense is None:
        command += " --dense-tower"
    write_manifest(final, {"command": command, "seconds": round(seconds, 1), "machine": _machine(),
                           "date": time.strftime("%Y-%m-%d"), "seed": seed, "scenes": plan.base_scenes,
                           "synth": asdict(SCENES), "reading": [asdict(c) for c in plan.reading],
                           "dense": asdict(plan.dense) if plan.dense else None, "dense_scenes": plan.dense_scenes,
                           "train": asdict(plan.base),
                           "val_accuracy": {k: summary[k] for k in ("easy", "hard", "overall")}})
    return final


@dataclass
class RunResult:
    label: str
    method: dict[str, Any]
    accuracy: dict[str, Any]
    gflops: float  # per sample, loupe.cost with the measured selection (or routing)
    llm_prefill_gflops: float  # per sample: the decoder's prefill (layers, LM head, method extras)
    prefill_ms: float  # per sample, batch 1, from pixels
    train_seconds: float
    final_loss: float


def finetune(run: Run, base: Path, train_ex: Sequence[Example], test_ex: Sequence[Example], tok: Tokenizer,
             plan: Plan, store: FeatureStore, out: Path, seed: int, progress: bool,
             ablation_ratio: float | None, looks: dict[str, list[viz.Look]] | None = None,
             trained: dict[str, VLM] | None = None) -> list[RunResult]:
    """Fine-tune `run` from the base and assess it (and, for `run.oracle`, the same model with
    oracle selection); the model is kept in `trained` under its label."""
    options = dict(run.options)
    if run.ablation and ablation_ratio is not None:
        options["ablation_ratio"] = ablation_ratio
    torch.manual_seed(seed)
    model = from_pretrained(base, run.method, dtype=torch.float32, **options)
    seconds, log = _train(model, train_ex, tok, plan.finetune, store, out, seed, progress, run.label)
    result = assess(run.label, model, test_ex, tok, plan, store, out, progress, seconds, log[-1]["loss"])
    if trained is not None:
        trained[run.label] = model
    if run.method == "flexattn" and looks is not None and run.label in OVERLAID:
        looks[run.label] = [_look(model, tok, ex, run.label) for ex in overlay_questions(test_ex)]
    if not run.oracle:
        return [result]
    # The same model with the ground-truth tag blocks selected, at the budget its own selection
    # took (questions without a tag get the central blocks): the ceiling of what selection gives it.
    ratio = result.accuracy["selected_fraction"]

    def oracle(samples: Sequence[Sample]) -> FlexRun:
        return FlexRun(boxes=tag_boxes(samples), ratio=ratio)

    label = f"{run.label}-oracle"
    if looks is not None:
        looks[label] = [_look(model, tok, ex, label, FlexRun(boxes=torch.tensor([ex.meta["tag_box"]]), ratio=ratio))
                        for ex in overlay_questions(test_ex)]
    return [result, assess(label, model, test_ex, tok, plan, store, out.with_name(label), progress, seconds,
                           log[-1]["loss"], run=oracle)]


OVERLAID = ("flexattn", "flexattn-random", "flexattn-center")  # and flexattn-oracle: the columns of the grid
OVERLAY_QUESTIONS = 4


def overlay_questions(test_ex: Sequence[Example]) -> list[Example]:
    """The test questions every overlay shows: the first hard ones that name a tag."""
    return [ex for ex in test_ex if ex.meta.get("kind") == "hard" and "tag_box" in ex.meta][:OVERLAY_QUESTIONS]


def _look(model: VLM, tok: Tokenizer, ex: Example, label: str, run: RunOptions | None = None) -> viz.Look:
    question, reference = ex.turns[0]
    return viz.look(model, tok, ex.image, question, title=label, run=run, max_new_tokens=4,
                    prompt_ids=prompt_ids(model, ex, tok), box=ex.meta["tag_box"],
                    answer=reference)


def write_overlays(looks: dict[str, list[viz.Look]], folder: Path) -> None:
    """overlays/selection.png (rows: questions, columns: strategies) and looks.json."""
    if not looks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(looks.values())
    grid = [[col[q] for col in columns] for q in range(min(len(c) for c in columns))]
    viz.draw(grid, folder / "selection.png", "where FlexAttention's answer row looked: its attention over the LR "
             "image (heat), the HR tokens its last layer selected (cyan), the named tag (yellow)")
    write_json(folder / "looks.json", {label: [asdict(lk) for lk in col] for label, col in looks.items()})


def _train(model: VLM, examples: Sequence[Example], tok: Tokenizer, cfg: TrainConfig, store: FeatureStore,
           out: Path, seed: int, progress: bool, desc: str) -> tuple[float, list[dict[str, Any]]]:
    samples, paths = tokenize(examples, tok, model)
    images = FeatureImages(model, paths, store, tag="train", progress=progress)
    start = time.perf_counter()
    log = train(model, InMemory(samples, images, tok.pad_id), TrainConfig(**{**asdict(cfg), "seed": seed}), out,
                progress=progress, desc=desc)
    return time.perf_counter() - start, log


def assess(label: str, model: VLM, test_ex: Sequence[Example], tok: Tokenizer, plan: Plan, store: FeatureStore,
           out: Path, progress: bool, seconds: float, final_loss: float,
           run: RunOptions | RunFor | None = None) -> RunResult:
    """Test-split accuracy, FLOPs per sample (measured selection or routing) and prefill latency,
    of the model run with `run` (e.g. one VISOR budget)."""
    test_samples, test_paths = tokenize(test_ex, tok, model)
    result = evaluate(model, test_samples, FeatureImages(model, test_paths, store, tag="test", progress=progress),
                      tok, progress=progress, run=run)
    summary = result.summary()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "predictions.json", [asdict(p) for p in result.predictions])
    workload = _workload(test_samples, tok.image_token_id, summary["selected_fraction"], _route_mix(model, result))
    # A per-batch run (the oracle) has the same options for every batch; its prefill costs what
    # the model's own selection does, so its latency is measured with that.
    fixed = run([test_samples[0]]) if callable(run) else run
    cost = estimate(model.cfg, model.method.run_options(fixed), workload)
    latency = prefill_latency(model, test_ex[: plan.latency_samples], tok, run=None if callable(run) else run)
    res = RunResult(label, cost.method, summary, cost.total / 1e9, cost.part("prefill") / 1e9, latency * 1e3,
                    seconds, final_loss)
    write_json(out / "metrics.json", asdict(res))
    return res


def _route_mix(model: VLM, result: EvalResult) -> tuple[float, ...] | None:
    """The fraction of test samples the router sent to each configuration (None: not routed)."""
    routes = [p.route for p in result.predictions if p.route is not None]
    if not routes:
        return None
    n = len(visor_method(model).configurations)
    return tuple(routes.count(k) / len(routes) for k in range(n))


def visor_runs(base: Path, train_ex: Sequence[Example], val_ex: Sequence[Example], test_ex: Sequence[Example],
               tok: Tokenizer, plan: Plan, store: FeatureStore, out: Path, seed: int,
               progress: bool) -> list[RunResult]:
    """VISOR's protocol on the same base, data and fine-tuning budget as the other methods:
    2/3 of the steps on the maximum configuration, the viable search on the validation split,
    1/3 universal (one viable configuration drawn per step); then the router, trained offline on
    the questions of `plan.router_scenes` training scenes. One row per budget, and two routed:
    the router as shipped and one taught by every question (see `loupe.visor_train`)."""
    torch.manual_seed(seed)
    model = from_pretrained(base, "visor", dtype=torch.float32, configuration="max", **VISOR)
    steps = plan.finetune.steps
    first = replace(plan.finetune, steps=max(1, 2 * steps // 3))
    second = replace(plan.finetune, steps=max(1, steps - first.steps), warmup=min(plan.finetune.warmup, 5))
    s1, log1 = _train(model, train_ex, tok, first, store, out / "visor-max", seed, progress, "visor max")
    val_samples, val_paths = tokenize(val_ex, tok, model)
    found = universal_setup(model, val_samples, FeatureImages(model, val_paths, store, tag="val", progress=progress),
                            tok, progress=progress)
    write_json(out / "visor-universal" / "viable.json", found)
    s2, log2 = _train(model, train_ex, tok, second, store, out / "visor-universal", seed, progress, "visor universal")
    method = visor_method(model)
    start = time.perf_counter()
    turns = single_turns(train_ex[: plan.router_scenes])
    samples, paths = tokenize(turns, tok, model)
    images = FeatureImages(model, paths, store, tag="router", progress=progress)
    scores = score_table(model, samples, images, progress=progress)
    states = routing_states(model, samples, images, progress=progress)
    shared = time.perf_counter() - start
    rows = []
    for k in range(len(method.configurations)):
        budget = VisorRun(configuration=k)
        label = f"visor [{method.run_options(budget).variant(model.cfg)}]"
        rows.append(assess(label, model, test_ex, tok, plan, store, out / f"visor-{k}", progress, s1 + s2,
                           log2[-1]["loss"], run=budget))
    # The router as shipped (only questions the maximum configuration answers teach it), and the
    # paper's rule applied to every question, where a failed maximum labels the cheapest budget.
    for label, solved_only in (("visor-router", True), ("visor-router-all", False)):
        start = time.perf_counter()
        report, _ = fit_router(model, [(t.id, t.meta.get("kind")) for t in turns], scores, states,
                               out / label / "router", seed=seed, overwrite=True, solved_only=solved_only)
        seconds = s1 + s2 + shared + time.perf_counter() - start
        rows.append(assess(label, model, test_ex, tok, plan, store, out / label, progress, seconds,
                           log2[-1]["loss"], run=VisorRun(configuration="router")))
        write_json(out / label / "router_report.json", asdict(report))
    return rows


def reduction_runs(hd: VLM, hd_loss: float, targets: dict[str, float], test_ex: Sequence[Example], tok: Tokenizer,
                   plan: Plan, store: FeatureStore, out: Path, progress: bool) -> list[RunResult]:
    """Every token-reduction peer on the trained `hd` model's weights, once per target (LLM
    prefill GFLOPs per sample, by name), at the largest knob that fits it (`REDUCTIONS`); a
    method that cannot get down to a target runs at its cheapest setting, flagged over budget.
    Training-free: no training seconds of their own, the hd run's final loss."""
    samples, _ = tokenize(test_ex, tok, hd)
    workload = _workload(samples, tok.image_token_id, None)
    rows = []
    for target, gflops in targets.items():
        for name, knob in REDUCTIONS.items():
            options, fits = fit_budget(hd.cfg, name, knob, gflops, workload)
            model = VLM(hd.cfg, method_options(name, hr_size=3 * NATIVE, **options)).eval()
            model.load_state_dict(hd.state_dict())  # these methods add no weights: the hd model as trained
            label = f"{name} @ {target}" + ("" if fits else " (over budget)")
            rows.append(assess(label, model, test_ex, tok, plan, store, out / f"{name}-{target}", progress, 0.0,
                               hd_loss))
    return rows


def fit_budget(cfg: VLMConfig, name: str, knob: Knob, gflops: float, workload: Workload) -> tuple[dict[str, Any], bool]:
    """The options of the largest knob x in (0, 1] whose LLM prefill fits `gflops` (bisection
    on the cost model), and whether any does (else the cheapest, x = 1 / HD_TOKENS)."""
    def cost(x: float) -> float:
        return estimate(cfg, method_options(name, hr_size=3 * NATIVE, **knob(x)), workload).part("prefill") / 1e9

    low, high = 1 / HD_TOKENS, 1.0
    if cost(low) > gflops:
        return knob(low), False
    if cost(high) <= gflops:
        return knob(high), True
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= gflops else (low, mid)
    return knob(low), True


def _workload(samples: Sequence[Sample], image_token_id: int, selected: float | None,
              mix: tuple[float, ...] | None = None) -> Workload:
    """The test split's mean prompt text tokens and answer tokens (with </s>)."""
    text = sum(s.prompt_length - s.ids.count(image_token_id) for s in samples) / len(samples)
    answer = sum(sum(s.scored) for s in samples) / len(samples)
    return Workload(prompt_tokens=round(text), new_tokens=max(1, round(answer)), selected=selected or 0.1, mix=mix)


def reproduce(out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = False,
              progress: bool = True, runs: Sequence[Run] = RUNS, with_visor: bool = True, stage: str = "all",
              base: str | Path | None = None, from_scratch: bool = False,
              resolutions: bool = False, base_steps: int | None = None,
              with_reductions: bool = True, dense_tower: bool = False,
              finetune_steps: int | None = None) -> dict[str, Any]:
    """The reproduction in `out` (`stage="base"`: only train the base and write its manifest).
    The base: `base` (a folder made by `--stage base`), else the shipped one, else - with
    `from_scratch` - trained here, for `base_steps` steps if given. `resolutions`: also
    FlexAttention at 2x and 4x. `with_reductions`: the token-reduction peers on the trained hd
    model at VISOR's smallest and FlexAttention's LLM prefill FLOPs. `dense_tower`: the base
    trained as `with_dense_tower` makes it. `finetune_steps`: every method's fine-tuning
    steps instead of the recipe's (VISOR splits them as it splits the recipe's)."""
    if stage not in STAGES:
        raise LoupeError(f"--stage {stage!r} does not exist; choose one of {list(STAGES)}")
    if base is not None and (from_scratch or stage == "base"):
        raise LoupeError("--base names a base to start from; it cannot go with --from-scratch or --stage base")
    if base_steps is not None and not (from_scratch or stage == "base"):
        raise LoupeError("--base-steps sets how long the base trains: give it with --stage base or --from-scratch")
    if base_steps is not None and base_steps < 1:
        raise LoupeError(f"--base-steps {base_steps} must be at least 1")
    if finetune_steps is not None and finetune_steps < 1:
        raise LoupeError(f"--finetune-steps {finetune_steps} must be at least 1")
    if finetune_steps is not None and stage == "base":
        raise LoupeError("--finetune-steps sets how long every method fine-tunes: --stage base fine-tunes none")
    if dense_tower and not (from_scratch or stage == "base"):
        raise LoupeError("--dense-tower says how the base trains: give it with --stage base or --from-scratch")
    out = Path(out)
    base_dir = None if from_scratch or stage == "base" else verified_base(Path(base) if base else SHIPPED_BASE)
    prepare_out(out, overwrite)
    plan = QUICK if quick else FULL
    if base_steps is not None:
        plan = replace(plan, base=replace(plan.base, steps=base_steps))
    if dense_tower:
        plan = with_dense_tower(plan, QUICK_DENSE if quick else DENSE)
    if finetune_steps is not None:
        plan = replace(plan, finetune=replace(plan.finetune, steps=finetune_steps))
    start = time.perf_counter()
    # --stage base needs only the validation split (its accuracy goes in the manifest)
    splits = ("val",) if stage == "base" else ("train", "val", "test")
    data = write_dataset(out / "data", plan.scenes, seed, SCENES, progress, splits)
    val_ex = read_llava(data / "val.json")
    if base_dir is None:
        base_data = write_dataset(out / "data" / "base", plan.base_scenes, seed, SCENES, progress, ("train",))
        base_ex = read_llava(base_data / "train.json")
        tok = dataset_tokenizer(base_ex, data / "tokenizer")
        base_dir = make_base(out, base_ex, val_ex, tok, plan, seed, quick, progress)
        if stage == "base":
            return {"stage": "base", "base": str(base_dir), "seconds": time.perf_counter() - start,
                    "manifest": json.loads((base_dir / MANIFEST).read_text())}
    else:
        tok = Tokenizer.from_folder(base_dir, image_token_id=4)
    train_ex, test_ex = read_llava(data / "train.json"), read_llava(data / "test.json")
    scenes = [ex for ex in train_ex if not ex.meta.get("crop") and not ex.meta.get("caption")]
    store: FeatureStore = {}
    results: list[RunResult] = []
    looks: dict[str, list[viz.Look]] = {}
    trained: dict[str, VLM] = {}
    for run in (r for r in runs if resolutions or not r.resolution):
        ratio = _attnmap_fraction(results) if run.ablation else None
        results += finetune(run, base_dir, scenes, test_ex, tok, plan, store, out / "runs" / run.label, seed,
                            progress, ratio, looks, trained)
    write_overlays(looks, out / "overlays")
    if with_visor:
        results += visor_runs(base_dir, scenes, val_ex, test_ex, tok, plan, store, out / "runs", seed, progress)
    targets = reduction_targets(results)
    if "hd" in trained and targets and with_reductions:
        hd_loss = next(r.final_loss for r in results if r.label == "hd")
        results += reduction_runs(trained["hd"], hd_loss, targets, test_ex, tok, plan, store, out / "runs", progress)
    report = {"quick": quick, "seed": seed, "seconds": time.perf_counter() - start, "machine": _machine(),
              "base": _base_record(base_dir),
              "plan": {"scenes": plan.scenes, "reading": [asdict(c) for c in plan.reading], "base": asdict(plan.base),
                       "finetune": asdict(plan.finetune)},
              "runs": [asdict(r) for r in results], "claims": claims(results)}
    write_json(out / "results.json", report)
    write_atomic(out / "results.md", table(results) + "\n\n" + claims_table(report["claims"]) + "\n")
    plot(results, out / "results.png", title=f"loupe reproduce (seed {seed}{', quick' if quick else ''})")
    return report


def _base_record(folder: Path) -> dict[str, Any]:
    """Where the run's base came from: its folder and manifest (command, time, machine, hashes)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return {"folder": str(folder), **{k: manifest.get(k) for k in ("command", "seconds", "machine", "date", "seed",
                                                                    "val_accuracy")},
            "sha256": manifest["files"].get("model.safetensors")}


def _attnmap_fraction(results: Sequence[RunResult]) -> float | None:
    for r in results:
        if r.label == "flexattn":
            return r.accuracy["selected_fraction"]
    return None


def _machine() -> dict[str, Any]:
    from loupe.bench import machine
    return machine(torch.device("cpu"))


# ---- claims, table, plot ------------------------------------------------------------------------
def claims(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """The issues' targets, each with the measured values and whether it holds."""
    return flexattn_claims(results) + visor_claims(results) + reduction_claims(results)


def reduction_targets(results: Sequence[RunResult]) -> dict[str, float]:
    """LLM prefill GFLOPs per sample the token-reduction rows are matched to."""
    by = {r.label: r for r in results}
    budgets = [r for r in results if r.label.startswith("visor [")]
    targets = {"visor-min": budgets[0].llm_prefill_gflops} if budgets else {}
    if "flexattn" in by:
        targets["flexattn"] = by["flexattn"].llm_prefill_gflops
    return targets


def reduction_claims(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """VISOR's claim against token reduction, and FlexAttention's the same way: at no more LLM
    prefill FLOPs (rows over budget are given more, which only favours them), the method beats
    every token-reduction row by >= 10 points on hard questions, while on easy questions the best
    of them is within 3 points of it."""
    by = {r.label: r for r in results}
    rows = []
    for method, target in (("visor-router", "visor-min"), ("flexattn", "flexattn")):
        peers = [r for r in results if " @ " in r.label and r.label.split(" @ ")[1].split(" ")[0] == target]
        if method not in by or not peers:
            continue
        ours = by[method].accuracy
        best_hard = max(peers, key=lambda r: r.accuracy["hard"])
        best_easy = max(peers, key=lambda r: r.accuracy["easy"])
        margin = ours["hard"] - best_hard.accuracy["hard"]
        gap = best_easy.accuracy["easy"] - ours["easy"]
        rows += [{"claim": f"{method} beats every token reduction at its LLM prefill by >= 10 on hard (vs "
                           f"{best_hard.label.split(' @ ')[0]})", "value": margin, "holds": margin >= 10},
                 {"claim": f"best token reduction ({best_easy.label.split(' @ ')[0]}) >= {method} - 3 on easy",
                  "value": gap, "holds": gap >= -3}]
    return rows


def visor_claims(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    by = {r.label: r for r in results}
    budgets = [r for r in results if r.label.startswith("visor [")]
    if not {"hd", "visor-router"} <= set(by) or not budgets:
        return []
    hd, routed, top = by["hd"], by["visor-router"], budgets[-1]
    a = routed.accuracy
    best_other = max((r.accuracy["overall"] for r in budgets[:-1]), default=top.accuracy["overall"])
    p, n = top.accuracy["overall"] / 100, top.accuracy["n"]
    noise = 200 * math.sqrt(p * (1 - p) / n)  # two binomial standard errors, in points
    return [
        {"claim": "visor-router overall >= hd - 2", "value": a["overall"] - hd.accuracy["overall"],
         "holds": a["overall"] >= hd.accuracy["overall"] - 2},
        {"claim": "visor-router LLM prefill FLOPs <= 0.25 x hd", "value": routed.llm_prefill_gflops /
         hd.llm_prefill_gflops, "holds": routed.llm_prefill_gflops <= 0.25 * hd.llm_prefill_gflops},
        {"claim": "router: fewer SA layers on easy than on hard questions (hard - easy)",
         "value": (a["sa_layers_hard"] or 0) - (a["sa_layers_easy"] or 0),
         "holds": (a["sa_layers_easy"] or 0) < (a["sa_layers_hard"] or 0)},
        {"claim": f"visor max configuration >= every smaller one, within noise (2 SE = {noise:.1f})",
         "value": top.accuracy["overall"] - best_other, "holds": top.accuracy["overall"] >= best_other - noise},
    ]


def flexattn_claims(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """FlexAttention's targets (issue: the main job shows what the papers claim)."""
    by = {r.label: r for r in results}
    if not {"lowres", "hd", "flexattn", "flexattn-random", "flexattn-center"} <= set(by):
        return []
    hard = {k: by[k].accuracy["hard"] for k in by}
    easy = {k: by[k].accuracy["easy"] for k in by}
    hit = {k: by[k].accuracy.get("tag_hit") or 0.0 for k in by}
    chance = 25.0
    return [
        {"claim": "lowres on hard questions <= chance (25%) + 8", "value": hard["lowres"],
         "holds": hard["lowres"] <= chance + 8},
        {"claim": "hd on hard questions >= 80", "value": hard["hd"], "holds": hard["hd"] >= 80},
        {"claim": "flexattn on hard questions >= hd - 3", "value": hard["flexattn"] - hard["hd"],
         "holds": hard["flexattn"] >= hard["hd"] - 3},
        {"claim": "flexattn on easy questions >= lowres - 2", "value": easy["flexattn"] - easy["lowres"],
         "holds": easy["flexattn"] >= easy["lowres"] - 2},
        {"claim": "attnmap selection beats random by >= 10 (hard)",
         "value": hard["flexattn"] - hard["flexattn-random"],
         "holds": hard["flexattn"] >= hard["flexattn-random"] + 10},
        {"claim": "attnmap selection beats center by >= 10 (hard)",
         "value": hard["flexattn"] - hard["flexattn-center"],
         "holds": hard["flexattn"] >= hard["flexattn-center"] + 10},
        {"claim": "attnmap tag-hit rate >= 2 x random's (ratio)",
         "value": hit["flexattn"] / max(hit["flexattn-random"], 1e-9),
         "holds": hit["flexattn"] >= 2 * hit["flexattn-random"]},
        {"claim": "flexattn FLOPs per sample <= 0.5 x hd", "value": by["flexattn"].gflops / by["hd"].gflops,
         "holds": by["flexattn"].gflops <= 0.5 * by["hd"].gflops},
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(results: Sequence[RunResult]) -> str:
    lines = ["| method | easy | hard | overall | hard, small objects | hard, large objects | selected | tag hit | "
             "SA layers easy / hard | GFLOPs / sample | LLM prefill GFLOPs | prefill ms / sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a = r.accuracy
        sel = "-" if a["selected_fraction"] is None else f"{100 * a['selected_fraction']:.0f}%"
        sa = "-" if a.get("sa_layers") is None else f"{a['sa_layers_easy']:.2f} / {a['sa_layers_hard']:.2f}"
        lines.append(f"| {r.label} | {_pct(a['easy'])} | {_pct(a['hard'])} | {_pct(a['overall'])} | "
                     f"{_pct(a['hard_small'])} | {_pct(a['hard_large'])} | {sel} | {_pct(a.get('tag_hit'))} | {sa} | "
                     f"{r.gflops:.3f} | "
                     f"{r.llm_prefill_gflops:.3f} | {r.prefill_ms:.1f} |")
    return "\n".join(lines)


def claims_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | measured | holds |", "|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['claim']} | {c['value']:.2f} | {'yes' if c['holds'] else 'NO'} |")
    return "\n".join(lines)


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Two panels, one labelled point per method: hard-question accuracy against FLOPs per
    sample (FlexAttention's axis), overall accuracy against the LLM's prefill FLOPs (VISOR's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    _panel(left, [(r.label, r.gflops, r.accuracy["hard"]) for r in results],
           "GFLOPs per sample (loupe.cost, measured selection / routing)", "accuracy on hard questions (%)",
           chance=True)
    _panel(right, [(r.label, r.llm_prefill_gflops, r.accuracy["overall"]) for r in results],
           "LLM prefill GFLOPs per sample (decoder, CA layers, router)", "overall accuracy (%)", chance=False)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _panel(ax: Any, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str, chance: bool) -> None:
    placed: list[tuple[float, float]] = []
    for name, x, y in points:
        ax.scatter(x, y, s=40, marker="s" if name.startswith("visor") else "o")
        near = sum(abs(x - px) < 0.05 * max(x, px) and abs(y - py) < 1.5 for px, py in placed)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * near), fontsize=7)
        placed.append((x, y))
    if chance:
        ax.axhline(25, color="grey", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], 26, " chance", color="grey", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def print_report(report: dict[str, Any], out: Path) -> None:
    results = [RunResult(**r) for r in report["runs"]]
    print(table(results))
    print()
    print(claims_table(report["claims"]))
    base = report.get("base") or {}
    print(f"\nbase: {base.get('folder')} ({base.get('command')}, {base.get('seconds')} s on "
          f"{(base.get('machine') or {}).get('cpu', '?')})")
    print(f"{report['seconds']:.0f} s on {report['machine'].get('cpu', '?')}; results in {out}/results.json, "
          f"results.md, results.png")


# ---- several seeds --------------------------------------------------------------------------
SEED_COLUMNS = ("easy", "hard", "hard_short", "hard_mc", "overall", "tag_hit")


def seed_summary(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and column: every seed's value, the mean and the standard deviation over
    seeds; per claim: the measured value per seed and on how many seeds it holds."""
    seeds = [r["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise LoupeError(f"the reports repeat a seed ({seeds}); give one report per seed")
    labels = [r["label"] for r in reports[0]["runs"]]
    methods: dict[str, Any] = {}
    for label in labels:
        per = [next((x for x in r["runs"] if x["label"] == label), None) for r in reports]
        if any(x is None for x in per):
            continue  # a method not run on every seed is not summarised
        methods[label] = {col: _spread([x["accuracy"].get(col) for x in per]) for col in SEED_COLUMNS}
    claims_by = [{c["claim"]: c for c in r["claims"]} for r in reports]
    rows = [{"claim": name, "values": [c[name]["value"] for c in claims_by],
             "holds": sum(bool(c[name]["holds"]) for c in claims_by), "seeds": len(reports)}
            for name in claims_by[0] if all(name in c for c in claims_by)]
    return {"seeds": seeds, "methods": methods, "claims": rows,
            "seconds": [r["seconds"] for r in reports], "machine": reports[0].get("machine")}


def _spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    xs = [float(v) for v in values if v is not None]
    if len(xs) < len(values):
        return None
    return {"values": xs, "mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    return f"{v['mean']:.1f} ± {v['sd']:.1f} ({' / '.join(f'{x:.1f}' for x in v['values'])})"


def seed_table(summary: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"| method (seeds {seeds}) | " + " | ".join(f"{c}: mean ± sd (per seed)" for c in SEED_COLUMNS) + " |",
             "|---|" + "---|" * len(SEED_COLUMNS)]
    for label, cols in summary["methods"].items():
        cells = [_cell(cols[c]) for c in SEED_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured per seed | holds on |", "|---|---|---|"]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | {' / '.join(f'{v:.2f}' for v in c['values'])} | {c['holds']} of {c['seeds']} |")
    return "\n".join(lines)
