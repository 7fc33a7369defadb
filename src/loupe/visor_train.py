"""VISOR's training beyond `loupe.train`: the viable-configuration search, the router's
pseudo-labels, and the router itself (DESIGN.md section 3).

Universal training, in three steps:
1. pretrain the maximum configuration (`loupe train --method visor -o configuration=max`);
2. find the viable configurations: evaluate SA subsets on a validation split and keep, for
   each number of SA layers, the best subset (`viable_configurations`; exhaustive up to
   `EXHAUSTIVE` SA layers, greedy backward elimination beyond);
3. fine-tune drawing one viable configuration per step (`configuration="sample"`, the
   method's `on_train_step`); steps 2 and 3 are `loupe train --viable-from VAL.json`.

The router is trained offline on a frozen universal model: every (image, question) of the
training data is scored under every configuration, its label is the cheapest configuration
whose score reaches 99% of the maximum configuration's (`router_labels`), and the MLP on
the routing token's hidden state learns the labels with cross-entropy (`train_router`).
Scores, under teacher forcing (`SCORES`):
- "exact" (default): 1 when every answer token (and its </s>) is the argmax - exactly
  when greedy decoding produces the answer, the benchmark's metric - else 0;
- "likelihood": the probability the configuration gives the whole reference answer.
Which samples teach the router (`solved_only`, default True): only those the maximum
configuration scores above 0 on. For a sample the maximum cannot answer the rule is
vacuous (0 >= 0.99 x 0 makes the cheapest configuration "good enough"), so it says
nothing about the budget the question needs - yet with every sample kept those labels
dominate. Measured on the built-in benchmark (seed 0, 1194 training questions): with every
sample, exact scores put 84% of the labels on the cheapest configuration and easy and hard
questions got the same label mix, and so did likelihood scores (whose per-question
differences between configurations are mostly noise: easy 334 / 93 / 320, hard
198 / 79 / 170 for no / one / two SA layers); with solved samples only (549), easy
questions are labelled 296 / 39 / 36 and hard ones 66 / 102 / 10, and the router tells them
apart.

Shape legend: S samples, C configurations, W text width.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from loupe.data.batches import Sample, collate, tokenize
from loupe.data.llava import Example
from loupe.errors import LoupeError
from loupe.evaluate import evaluate
from loupe.files import folder_atomic, read_json, write_json
from loupe.methods.visor import Visor, VisorRun, all_subsets
from loupe.text import Tokenizer
from loupe.train import ImageSource
from loupe.vlm import VLM

EXHAUSTIVE = 6  # SA layers up to which every subset is evaluated (2^6 = 64 evaluations)
RULE = 0.99  # a configuration is good enough for a sample at 99% of the maximum's score


def visor_method(model: VLM) -> Visor:
    if not isinstance(model.method, Visor):
        raise LoupeError(f"this needs a visor model, not {model.method.name!r} (convert it with --method visor)")
    return model.method


# ---- viable configurations ------------------------------------------------------------------------
@torch.no_grad()
def viable_configurations(model: VLM, samples: Sequence[Sample], images: ImageSource, tok: Tokenizer,
                          progress: bool = True) -> dict[str, Any]:
    """Score SA subsets on `samples` (overall exact match, %) and keep the best per size.
    Returns {"configurations": [...] cheapest first, "scores": {subset: accuracy}}."""
    method = visor_method(model)
    scores: dict[tuple[int, ...], float] = {}
    bar = tqdm(desc="viable", unit="subset", disable=not progress, leave=False)

    def score(subset: tuple[int, ...]) -> float:
        if subset not in scores:
            run = VisorRun(configurations=[list(subset)])
            scores[subset] = float(evaluate(model, samples, images, tok, progress=False, run=run).summary()["overall"])
            bar.update()
        return scores[subset]

    ladder = best_per_size(method.sa_layers, score)
    bar.close()
    return {"configurations": [list(c) for c in ladder],
            "scores": {",".join(map(str, k)): v for k, v in scores.items()}}


def best_per_size(sa_layers: Sequence[int], score: Callable[[tuple[int, ...]], float],
                  exhaustive: int = EXHAUSTIVE) -> list[tuple[int, ...]]:
    """The best-scoring subset of `sa_layers` for each size 0..n, smallest first: every
    subset when n <= `exhaustive`, else greedy backward elimination from the full set
    (drop the layer whose removal scores best, one at a time; n(n+1)/2 evaluations).
    Ties go to the subset of earlier layers."""
    sa = tuple(sorted(sa_layers))
    best: dict[int, tuple[int, ...]] = {}
    if len(sa) <= exhaustive:
        for subset in (tuple(c) for c in all_subsets(sa)):
            value = score(subset)  # every subset is scored (and reported), even a size's only one
            if len(subset) not in best or value > score(best[len(subset)]):
                best[len(subset)] = subset
    else:
        current = sa
        best[len(sa)] = current
        while current:
            options = [tuple(i for i in current if i != drop) for drop in reversed(current)]
            current = max(options, key=score)  # max keeps the first of equals: drop the latest layer
            best[len(current)] = current
    return [best[size] for size in sorted(best)]


def universal_setup(model: VLM, samples: Sequence[Sample], images: ImageSource, tok: Tokenizer,
                    progress: bool = True) -> dict[str, Any]:
    """Steps 2 and 3's set-up: find the viable configurations on `samples` and make the model
    train them, one drawn per step."""
    found = viable_configurations(model, samples, images, tok, progress=progress)
    visor_method(model).redefine(found["configurations"], configuration="sample")
    return found


# ---- router labels ------------------------------------------------------------------------------
def single_turns(examples: Sequence[Example]) -> list[Example]:
    """Every (image, question, answer) turn as its own one-turn example (the router decides per question)."""
    out = []
    for ex in examples:
        per_turn = ex.meta.get("turns")
        shared = {k: v for k, v in ex.meta.items() if k != "turns"}
        for k, turn in enumerate(ex.turns):
            meta = {**shared, **(per_turn[k] if isinstance(per_turn, list) and k < len(per_turn) else {}), "turn": k}
            out.append(Example(f"{ex.id}#{k}", ex.image, [turn], meta))
    return out


SCORES = ("exact", "likelihood")


@torch.no_grad()
def score_table(model: VLM, samples: Sequence[Sample], images: ImageSource, batch_size: int = 16,
                progress: bool = True, score: str = "exact") -> torch.Tensor:
    """(S, C) teacher-forced score in [0, 1] of every sample under every configuration."""
    if score not in SCORES:
        raise LoupeError(f"unknown router score {score!r}; choose one of {list(SCORES)}")
    method = visor_method(model)
    model.eval()
    table = torch.zeros(len(samples), len(method.configurations))
    chunks = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
    bar = tqdm(total=len(chunks) * len(method.configurations), desc="scores", disable=not progress, leave=False)
    for c, configuration in enumerate(method.configurations):
        for idx in chunks:
            batch = collate([samples[i] for i in idx], pad_id=0)
            pics = images.model_inputs(batch.images)
            out = model(batch.input_ids.to(model.device), pics.pixel_values, batch.attention_mask.to(model.device),
                        image_sizes=pics.image_sizes, images=pics.images,
                        run=VisorRun(configurations=[configuration]))
            logits, rows = out.logits.float().cpu(), batch.loss_rows
            if score == "exact":
                table[idx, c] = ((logits.argmax(-1) == batch.targets) | ~rows).all(-1).float()
            else:
                logp = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None])[..., 0]  # (B, T)
                table[idx, c] = logp.masked_fill(~rows, 0.0).sum(-1).exp()
            bar.update()
    bar.close()
    return table


def router_labels(scores: torch.Tensor, rule: float = RULE) -> torch.Tensor:
    """(S, C) scores (configurations cheapest first, the last the maximum) -> (S,) the index of
    the cheapest configuration whose score reaches `rule` x the maximum configuration's."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise LoupeError(f"a score table must be (samples, configurations), got shape {tuple(scores.shape)}")
    if bool((scores < 0).any()):
        raise LoupeError("router scores must be non-negative (the 99% rule compares fractions of the maximum)")
    good = scores >= rule * scores[:, -1:]  # (S, C); the maximum itself always qualifies
    return good.float().argmax(-1)  # first True


def informative(scores: torch.Tensor) -> torch.Tensor:
    """(S,) True where the maximum configuration scores above 0 - where the rule says something."""
    return scores[:, -1] > 0


def label_table(model: VLM, ids: Sequence[tuple[str, Any]], scores: torch.Tensor, score: str = "exact",
                solved_only: bool = True) -> dict[str, Any]:
    """The labels as JSON: the configurations, the rule, and per sample its id, kind, scores,
    label and whether it teaches the router."""
    labels, used = router_labels(scores), informative(scores) if solved_only else torch.ones(len(scores), dtype=bool)
    return {"configurations": [list(c) for c in visor_method(model).configurations], "rule": RULE, "score": score,
            "solved_only": solved_only,
            "samples": [{"id": i, "kind": kind, "scores": scores[row].tolist(), "label": int(labels[row]),
                         "used": bool(used[row])} for row, (i, kind) in enumerate(ids)]}


def read_labels(path: str | os.PathLike[str], model: VLM, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) labels and (S,) which samples teach the router, from a `label_table` file, checked
    against the model's configurations and the samples."""
    table = read_json(path, dict, "router labels")
    if not isinstance(table.get("samples"), list):
        raise LoupeError(f"{path} is not a labels file of `loupe router labels` (an object with 'configurations' "
                         "and 'samples')")
    mine = [list(c) for c in visor_method(model).configurations]
    if table.get("configurations") != mine:
        raise LoupeError(f"the labels in {path} are for configurations {table.get('configurations')}, but the "
                         f"model has {mine}")
    theirs = [s.get("id") if isinstance(s, dict) else None for s in table["samples"]]
    if theirs != list(ids):
        raise LoupeError(f"the labels in {path} are for {len(theirs)} samples that are not the data's {len(ids)} "
                         "questions in order; build them from the same --data")
    rows = table["samples"]
    for k, s in enumerate(rows):
        label, used = s.get("label"), s.get("used", True)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(mine):
            raise LoupeError(f"{path}: sample {k} ({s.get('id')!r}) has label {label!r}; labels index the "
                             f"{len(mine)} configurations (0..{len(mine) - 1})")
        if not isinstance(used, bool):
            raise LoupeError(f"{path}: sample {k} ({s.get('id')!r}) has used={used!r}; expected true or false")
    return (torch.tensor([s["label"] for s in rows], dtype=torch.long),
            torch.tensor([s.get("used", True) for s in rows], dtype=torch.bool))


# ---- the router ---------------------------------------------------------------------------------
@dataclass
class RouterReport:
    configurations: list[list[int]]
    samples: int
    label_counts: list[int]  # per configuration
    train_accuracy: float  # % of samples whose label the router predicts
    epochs: int
    final_loss: float


@torch.no_grad()
def routing_states(model: VLM, samples: Sequence[Sample], images: ImageSource, batch_size: int = 32,
                   progress: bool = True) -> torch.Tensor:
    """(S, W) routing-token hidden states of the samples' prompts."""
    method = visor_method(model)
    model.eval()
    states = []
    for start in tqdm(range(0, len(samples), batch_size), desc="routing states", disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        prompts = [Sample(s.ids[: s.prompt_length], [False] * s.prompt_length, s.image) for s in chunk]
        batch = collate(prompts, pad_id=0)
        pics = images.model_inputs(batch.images)
        states.append(method.routing_states(model, input_ids=batch.input_ids.to(model.device),
                                            attention_mask=batch.attention_mask.to(model.device),
                                            pixel_values=pics.pixel_values, image_sizes=pics.image_sizes,
                                            images=pics.images).float().cpu())
    return torch.cat(states)


def train_router(model: VLM, states: torch.Tensor, labels: torch.Tensor, epochs: int = 300, lr: float = 3e-3,
                 seed: int = 0) -> RouterReport:
    """Cross-entropy on (states (S, W), labels (S,)), full batch, AdamW; the router only."""
    method = visor_method(model)
    if states.shape[0] != labels.shape[0] or states.shape[0] == 0:
        raise LoupeError(f"{states.shape[0]} routing states for {labels.shape[0]} labels")
    torch.manual_seed(seed)
    method.reset_router()
    router = method.router
    params = list(router.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    x = states.to(model.device, method.route_token.dtype)
    y = labels.to(model.device)
    router.train()
    loss = torch.tensor(0.0)
    with torch.enable_grad():  # callers may hold no_grad / inference mode for the frozen model
        for _ in range(epochs):
            loss = F.cross_entropy(router(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    router.eval()
    with torch.no_grad():
        accuracy = 100 * float((router(x).argmax(-1) == y).float().mean())
    counts = torch.bincount(labels, minlength=len(method.configurations)).tolist()
    return RouterReport([list(c) for c in method.configurations], len(labels), counts, accuracy, epochs,
                        loss.item())


def save_router(model: VLM, folder: str | os.PathLike[str], report: RouterReport, overwrite: bool = False,
                labels: dict[str, Any] | None = None) -> Path:
    """router.safetensors + router.json (+ labels.json), written to a temporary folder that
    replaces `folder` whole."""
    method = visor_method(model)
    with folder_atomic(folder, overwrite) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in method.router.state_dict().items()}
        save_file(state, str(tmp / "router.safetensors"))
        meta = {"configurations": report.configurations, "sa_layers": method.sa_layers,
                "ca_layers": method.ca_layers, "report": asdict(report)}
        (tmp / "router.json").write_text(json.dumps(meta, indent=2) + "\n")
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return Path(folder)


def load_router(model: VLM, folder: str | os.PathLike[str]) -> VisorRun:
    """Install the router saved in `folder`; returns the run options that route with it
    (pass them to `generate` / `evaluate`)."""
    method = visor_method(model)
    folder = Path(folder)
    files = folder / "router.json", folder / "router.safetensors"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise LoupeError(f"{folder} is not a router folder: {', '.join(missing)} missing")
    try:
        meta = json.loads(files[0].read_text())
        state = load_file(str(files[1]))
    except Exception as e:  # JSON, UTF-8 or safetensors' own error: a corrupt router folder
        raise LoupeError(f"{folder}: cannot read the router ({str(e).splitlines()[0][:200]})") from None
    configurations = meta.get("configurations") if isinstance(meta, dict) else None
    if not isinstance(configurations, list) or not all(
            isinstance(c, list) and all(isinstance(i, int) for i in c) for c in configurations):
        raise LoupeError(f"{files[0]}: 'configurations' must be a list of lists of layer indices, not "
                         f"{configurations!r}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not math.isfinite(float(v.sum()))]
    if bad:
        raise LoupeError(f"{files[1]}: router weight(s) {bad} hold NaN or inf")
    method.load_router(state, configurations)
    return VisorRun(configuration="router")


def fit_router(model: VLM, ids: Sequence[tuple[str, Any]], scores: torch.Tensor, states: torch.Tensor,
               out: str | os.PathLike[str] | None = None, epochs: int = 300, seed: int = 0, overwrite: bool = False,
               score: str = "exact", solved_only: bool = True) -> tuple[RouterReport, dict[str, Any]]:
    """Label the (S, C) `scores`, train the router on the (S, W) routing `states` of the samples
    that teach it, and save it (with labels.json) to `out` when given."""
    table = label_table(model, ids, scores, score, solved_only)
    used = torch.tensor([s["used"] for s in table["samples"]], dtype=torch.bool)
    if not bool(used.any()):
        raise LoupeError("no sample teaches the router: the maximum configuration answers none of them")
    report = train_router(model, states[used], router_labels(scores)[used], epochs=epochs, seed=seed)
    if out is not None:
        save_router(model, out, report, overwrite=overwrite, labels=table)
    return report, table


# ---- from files (what `loupe router labels` / `loupe router train` call) ----------------------------
@dataclass
class RouterData:
    """A universal VISOR model and the routing samples of a LLaVA-format file (one per question)."""

    model: VLM
    ids: list[tuple[str, Any]]  # (sample id, question kind) per routing sample
    samples: list[Sample]
    images: ImageSource


def router_data(model_dir: str | os.PathLike[str], data: str | os.PathLike[str], device: str = "cpu") -> RouterData:
    from loupe.checkpoints import from_pretrained
    from loupe.data.llava import read_llava
    from loupe.train import FeatureImages

    model = from_pretrained(model_dir, dtype=torch.float32, device=device)
    visor_method(model)
    tok = Tokenizer.from_folder(model_dir, model.cfg.image_token_id)
    turns = single_turns(read_llava(data))
    samples, paths = tokenize(turns, tok, model)
    return RouterData(model, [(t.id, t.meta.get("kind")) for t in turns], samples, FeatureImages(model, paths))


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LoupeError(f"{out} already exists; pass --overwrite to replace it")


def write_router_labels(rd: RouterData, out: str | os.PathLike[str], score: str = "exact", solved_only: bool = True,
                        overwrite: bool = False) -> dict[str, Any]:
    """Score every configuration on every routing sample and write the label table (JSON)."""
    _refuse_existing(Path(out), overwrite)
    scores = score_table(rd.model, rd.samples, rd.images, score=score)
    table = label_table(rd.model, rd.ids, scores, score, solved_only=solved_only)
    write_json(out, table)
    return table


def train_router_from(rd: RouterData, out: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None,
                      epochs: int = 300, seed: int = 0, score: str = "exact", solved_only: bool = True,
                      overwrite: bool = False) -> RouterReport:
    """Train the router on a label file (`write_router_labels`), or on labels built now, and save it to `out`."""
    _refuse_existing(Path(out), overwrite)
    if epochs < 1:
        raise LoupeError(f"epochs={epochs} must be at least 1 (a router trained for no epoch is untrained)")
    states = routing_states(rd.model, rd.samples, rd.images)
    if labels is not None:
        chosen, used = read_labels(labels, rd.model, [i for i, _ in rd.ids])
        report = train_router(rd.model, states[used], chosen[used], epochs=epochs, seed=seed)
        save_router(rd.model, out, report, overwrite=overwrite)
        return report
    scores = score_table(rd.model, rd.samples, rd.images, score=score)
    report, _ = fit_router(rd.model, rd.ids, scores, states, out, epochs, seed, overwrite, score,
                           solved_only=solved_only)
    return report
