"""`loupe` command line. Each subcommand is a small function; bad input (a LoupeError)
prints one clear line and exits with status 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from loupe.checkpoints import convert, from_pretrained, model_info
from loupe.cost import CONVENTIONS, PRESETS, preset
from loupe.decode import DecodeMode
from loupe.distributed import check_device
from loupe.errors import Interrupted, LoupeError
from loupe.files import check_writable, write_json
from loupe.flops import Workload
from loupe.generation import SamplingConfig, answer, stream_printer
from loupe.methods import METHODS, MethodReport, RunOptions, parse_method
from loupe.methods.base import check_shared_options
from loupe.text import Tokenizer
from loupe.vlm import VLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        if isinstance(getattr(args, "device", None), str):
            check_device(args.device)  # before any work
        return args.run(args) or 0
    except Interrupted as e:
        print(f"loupe: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("loupe: interrupted", file=sys.stderr)
        return 130
    except LoupeError as e:
        print(f"loupe: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `loupe info | head -1`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    except OSError as e:  # the machine's, not Loupe's: a full disk, a permission, a vanished file
        where = f" ({e.filename})" if e.filename else ""
        print(f"loupe: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description="High-resolution VLMs that look closely only "
                                     "where it matters (FlexAttention, VISOR and baselines).")
    sub = parser.add_subparsers(title="commands")
    for add in (_add_generate, _add_info, _add_convert, _add_demo, _add_flops, _add_bench, _add_data, _add_train,
                _add_export, _add_eval, _add_router, _add_reproduce):
        add(sub)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face LLaVA layout)")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="method (default: the checkpoint's)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. -o dominant=54 -o contextual=10 (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored (fp16 -> bf16 on CPU)")
    p.add_argument("--device", default="cpu")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about an image, streaming tokens")
    _model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question; the model family's chat template is applied")
    p.add_argument("--router", default=None, help="visor: route with this trained router (loupe router train)")
    p.add_argument("--overlay", default=None, metavar="OUT.png",
                   help="also draw where the model looked (attention, selected HR blocks, answer) to this PNG")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="decode with static shapes through torch.compile (gpt-fast's recipe; the first call compiles); "
                        "a method whose step cannot be static decodes eagerly, with a warning")
    p.set_defaults(run=cmd_generate)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="config, parameter counts and method of a checkpoint")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_info)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="turn a LLaVA checkpoint into a Loupe checkpoint of a method")
    p.add_argument("src", help="LLaVA checkpoint folder (HF layout), or the FlexAttention release's LLM folder")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. -o hr_size=1008 -o threshold=48 (repeatable)")
    p.add_argument("--clip", default=None, help="CLIP folder: SRC is in the released FlexAttention layout")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_convert)


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings -> options, values read as JSON where they parse (numbers, true, null)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LoupeError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise LoupeError(f"{flag} {text!r} is not a comma-separated list of numbers") from None


def cmd_convert(args: argparse.Namespace) -> int:
    model = convert(args.src, args.dst, args.method, options=parse_options(args.option), clip=args.clip,
                    dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)
    print(f"wrote {args.method} checkpoint to {args.dst} ({model.method.options.to_dict()})")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="smoke run: build a tiny random model and generate from it")
    p.add_argument("--out", default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(run=cmd_demo)


def _load(args: argparse.Namespace) -> VLM:
    dtype = DTYPES[args.dtype] if args.dtype else None
    return from_pretrained(args.model, args.method, dtype=dtype, device=args.device, **parse_options(args.option))


def run_generation(model: VLM, tok: Tokenizer, image_path: str, prompt: str, sampling: SamplingConfig,
                   run: RunOptions | None = None, overlay: str | None = None, decode: DecodeMode = "eager") -> str:
    reports: list[MethodReport] = []
    text = answer(model, tok, image_path, prompt, sampling, run, on_token=stream_printer(tok),
                  on_report=reports.append, decode=decode)
    print()
    if overlay:
        from loupe import viz
        attention, selected = viz.from_report(reports[0])
        seen = viz.Look(image_path, prompt, text, model.method.name, attention, selected)
        print(f"where it looked: {viz.draw([[seen]], overlay)}")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
    except UnicodeEncodeError:
        raise LoupeError(f"--prompt {args.prompt!r} is not valid UTF-8 text") from None
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, [], args.seed)  # before loading
    if args.overlay:
        from loupe.viz import check_output
        check_output(args.overlay)  # before any work
    model = _load(args)
    run = None
    if args.router:
        from loupe.visor_train import load_router
        run = load_router(model, args.router)
    tok = Tokenizer.from_folder(args.model, model.cfg.image_token_id)
    stops = [tok.eos_id] if tok.eos_id is not None else model.cfg.text.eos_token_ids
    sampling = dataclasses.replace(sampling, stop_tokens=stops)
    run_generation(model, tok, args.image, args.prompt, sampling, run, args.overlay,
                   "compiled" if args.compile else "eager")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(_load(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters"]
    assert isinstance(params, dict)
    print(f"method: {info['method']}")
    print(f"dtype: {info['dtype']}   image tokens per image: {info['image_tokens_per_image']}")
    for part, n in params.items():
        print(f"  {part:<13} {n:>15,d} parameters")
    cfg = info["config"]
    assert isinstance(cfg, dict)
    print(f"vision: {json.dumps(cfg['vision'])}")
    print(f"text:   {json.dumps(cfg['text'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from loupe.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out) if args.out else Path(tmp) / "tiny-llava"
        write_tiny_checkpoint(folder, overwrite=True)
        image_path = Path(tmp) / "demo.png"
        Image.new("RGB", (80, 60), (200, 30, 30)).save(image_path)
        model = from_pretrained(folder, dtype=torch.float32)
        tok = Tokenizer.from_folder(folder, model.cfg.image_token_id)
        print(f"tiny random LLaVA at {folder} (untrained: the words are noise; the pipeline is real)")
        start = time.perf_counter()
        run_generation(model, tok, str(image_path), "What is in the image?",
                       SamplingConfig(max_new_tokens=args.max_new_tokens))
        print(f"generated {args.max_new_tokens} tokens in {time.perf_counter() - start:.2f}s")
    return 0


# ---- cost and latency -------------------------------------------------------------------
def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hr-size", type=int, default=None, help="HR image side for HR methods (default: each method's)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method option where the method has it, e.g. -o tiles=true (repeatable)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the prompt besides the image")
    p.add_argument("--new-tokens", type=int, default=8, help="generated tokens (the first comes from prefill)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--selected-ratio", type=float, default=0.1,
                   help="FlexAttention: fraction of HR tokens selected (paper: about 10%%)")
    p.add_argument("--hr-tiles", type=float, default=1.0,
                   help="FlexAttention with lazy_hr=true: fraction of HR tiles encoded, as `loupe bench` "
                        "measures (default 1: every tile)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="input image (height x width) for models whose image tokens depend on it (OneVision); "
                        "default: the model's reference size")


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit() or min(int(h), int(w)) < 1:
        raise LoupeError(f"image size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 2304x2304")
    return int(h), int(w)


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="analytic FLOPs of a method, part by part (loupe.cost)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model shapes by name (see `loupe flops --preset list`)")
    src.add_argument("--model", help="checkpoint folder to take the config (and method) from")
    p.add_argument("--method", default=None, help="METHOD or METHOD@HR_SIZE (default: lowres, or the checkpoint's)")
    p.add_argument("--compare", nargs="+", metavar="METHOD", default=None,
                   help="several methods side by side, ratios to the first, e.g. lowres hd@448 flexattn")
    _workload_args(p)
    p.add_argument("--reproject", action="store_true", help="FlexAttention decode re-projects HR keys (no memo)")
    p.add_argument("--lm-head", choices=["last", "all"], default="last", help="prefill logits for which positions")
    p.add_argument("--convention", choices=list(CONVENTIONS), default="flops")
    p.add_argument("--mix", default=None, metavar="F,F,...",
                   help="visor -o configuration=router: fraction of samples per configuration, cheapest first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_flops)


def cmd_flops(args: argparse.Namespace) -> int:
    from loupe.cost import flops_report

    workload = Workload(args.prompt_tokens, args.new_tokens, args.batch, selected=args.selected_ratio,
                        memoised=not args.reproject, hr_tiles=args.hr_tiles, lm_head=args.lm_head,
                        mix=_floats(args.mix, "--mix"), image_size=_image_size(args.image_size))
    report = flops_report(args.preset, args.model, args.compare or ([args.method] if args.method else None), workload,
                          hr_size=args.hr_size, options=parse_options(args.option), convention=args.convention)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency of methods side by side (interleaved, medians), with predicted ratios")
    p.add_argument("--preset", default="llava-1.5-7b", help=f"model shapes: one of {sorted(PRESETS)}")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   default=["lowres", "hd", "xattn", "flexattn", "visor@672", "visor@672,configuration=min"],
                   help="METHOD[@HR_SIZE][,KEY=VALUE...]; the first is the reference of the ratios (visor at "
                        "672 px by default: at 1008, LLaVA-1.5's 4096 positions are too few for its 5760 tokens)")
    _workload_args(p)
    p.add_argument("--layers", type=int, default=2, help="decoder layers kept (0: all)")
    p.add_argument("--vision-layers", type=int, default=0, help="encoder layers kept (0: all)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="where the JSON results go")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from loupe.bench import BenchConfig, benchmark, table

    check_writable(args.out, "--out")  # before the measurement, not after it

    options = parse_options(args.option)
    # Random weights make the threshold rule's selected fraction meaningless: methods that
    # select do so with a fixed budget of blocks equal to --selected-ratio.
    check_shared_options(args.methods, options)
    methods = [parse_method(spec, args.hr_size, **{"budget": args.selected_ratio, **options})
               for spec in args.methods]
    cfg = BenchConfig(methods, layers=args.layers or None, vision_layers=args.vision_layers or None,
                      dtype=DTYPES[args.dtype], device=args.device, batch=args.batch,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, reps=args.reps,
                      warmup=args.warmup, seed=args.seed, image_size=_image_size(args.image_size))
    results = benchmark(preset(args.preset), cfg)
    results["preset"] = args.preset
    write_json(args.out, results)
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    image = f", {args.image_size} image" if args.image_size else ""
    print(f"{args.preset} cut to {args.layers or 'all'} decoder / {args.vision_layers or 'all'} encoder layers, "
          f"{args.dtype}{image}, batch {args.batch}, {args.prompt_tokens} text tokens, {args.new_tokens} new tokens, "
          f"{args.reps} interleaved reps, medians; {where}; torch {m['torch']}\n")
    print(table(results))
    print(f"\nratios: measured (predicted by loupe.cost FLOPs); JSON: {args.out}")
    return 0


# ---- data, training, the reproduction --------------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="datasets: generate the built-in synthetic HR-VQA benchmark")
    data = p.add_subparsers(title="data commands")
    synth = data.add_parser("synth", help="write scenes (PNG) and LLaVA-format train/val/test JSON")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, default=1500, help="training scenes (val n/10, test n/5)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--native", type=int, default=64, help="the model's native image side; images are 4x")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(run=cmd_data_synth)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from loupe.data.synthetic import synth_dataset

    counts = synth_dataset(args.out, args.n, args.seed, args.native, args.overwrite)
    print(f"wrote {args.out}: records {counts}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a checkpoint on a LLaVA-format dataset (also under "
                       "torchrun)", description="Settings come from --recipe (a shipped name or a YAML file), then "
                       "the flags given, then KEY=VALUE overrides (any recipe key; options.NAME=VALUE for a method "
                       "option). Under `torchrun --nproc_per_node=N -m loupe train ... --parallel ddp|fsdp` every "
                       "process runs this command.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lr=2e-5 steps=100")
    p.add_argument("--recipe", default=None, help="a shipped recipe name or a YAML file (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--model", default=None, help="checkpoint folder (Hugging Face LLaVA layout)")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="method (default: the checkpoint's)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default fp32: master "
                   "weights; --precision bf16 computes in bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--data", default=None, help="LLaVA-format JSON (image paths relative to it or --image-root)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", default=None, help="run folder: run.json, train_log.jsonl, checkpoint-N/, final/")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its latest checkpoint")
    for flag, kind, what in (("--steps", int, None), ("--batch-size", int, "the global batch"),
                             ("--micro-batch-size", int, "per process per forward (accumulation makes up the rest)"),
                             ("--lr", float, None), ("--warmup", int, None), ("--checkpoint-every", int, None),
                             ("--keep-last", int, "resumable checkpoints kept (0: all)"), ("--seed", int, None),
                             ("--num-workers", int, "DataLoader processes reading images")):
        p.add_argument(flag, type=kind, default=None, help=what)
    p.add_argument("--train", default=None,
                   help="comma-separated parameter prefixes to train (vision_tower, projector, decoder, method)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None)
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--viable-from", default=None, metavar="VAL_JSON",
                   help="visor universal training: find the viable configurations on this split first, then "
                        "train drawing one per step")
    p.add_argument("--cache-features", action="store_true",
                   help="with a frozen encoder: encode every image once and keep the features in memory")
    p.add_argument("--dry-run", action="store_true", help="print the per-process memory estimate and exit")
    p.add_argument("--nproc", type=int, default=None, help="with --dry-run: processes to estimate for "
                   "(default: the launched world)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_train)


# `loupe train` flags -> recipe keys (a flag left unset keeps the recipe's value).
TRAIN_FLAGS = {"model": "model", "method": "method", "data": "data", "image_root": "image_root",
               "viable_from": "viable_from", "steps": "steps", "batch_size": "batch_size",
               "micro_batch_size": "micro_batch_size", "lr": "lr", "warmup": "warmup",
               "checkpoint_every": "checkpoint_every", "keep_last": "keep_last", "seed": "seed",
               "num_workers": "num_workers", "precision": "precision", "parallel": "parallel",
               "activation_checkpointing": "activation_checkpointing"}


def train_recipe(args: argparse.Namespace) -> dict[str, object]:
    """The run's recipe: --resume's saved one, or --recipe's; then the flags; then the overrides."""
    from loupe.recipe import load_recipe, with_overrides
    from loupe.runs import read_spec

    if args.resume:
        spec = read_spec(Path(args.resume))
        recipe: dict[str, object] = {"model": spec.model, "method": spec.method, "options": spec.options,
                                     "data": spec.data, "image_root": spec.image_root, **spec.train}
    else:
        recipe = load_recipe(args.recipe) if args.recipe else {}
    given = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.train is not None:
        given["train"] = [p.strip() for p in args.train.split(",") if p.strip()]
    options = {**dict(recipe.get("options") or {}), **parse_options(args.option)}  # type: ignore[call-overload]
    return with_overrides({**recipe, **given, "options": options}, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from loupe.recipe import required, shipped, train_config
    from loupe.runs import RunSpec
    from loupe.train import train_run

    if args.list_recipes:
        print("\n".join(shipped()))
        return 0
    recipe = train_recipe(args)
    name = f"recipe {args.recipe}" if args.recipe else "this command"
    cfg = train_config(recipe)
    model, data = required(recipe, "model", name), required(recipe, "data", name)
    root = recipe.get("image_root")
    spec = RunSpec(model=str(Path(model).resolve()), method=recipe.get("method"),  # type: ignore[arg-type]
                   options=dict(recipe.get("options") or {}), data=str(Path(data).resolve()),  # type: ignore[call-overload]
                   image_root=str(Path(str(root)).resolve()) if root else None, train=dataclasses.asdict(cfg),
                   recipe=args.recipe)
    if args.dry_run:
        return _dry_run(spec, cfg, args)
    out = args.resume or args.out
    if out is None:
        raise LoupeError("give --out RUN for a new run (or --resume RUN to continue one)")
    viable = recipe.get("viable_from")
    try:
        done = train_run(spec, out, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device,
                         viable_from=str(viable) if viable else None, overwrite=args.overwrite,
                         resume=args.resume is not None, cache_features=args.cache_features)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if done.viable is not None:
        print(f"viable configurations: {done.viable['configurations']} (validation accuracy of every subset in "
              f"{Path(out) / 'viable.json'})")
    if done.log:
        print(f"trained to step {done.log[-1]['step']}, final loss {done.log[-1]['loss']:.4f}; model in {done.final}")
    return 0


def _dry_run(spec: object, cfg: object, args: argparse.Namespace) -> int:
    from loupe.memory import estimate_run, memory_table

    report = estimate_run(spec, cfg, args.nproc)  # type: ignore[arg-type]
    print(memory_table(report))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from loupe.tasks import TASKS

    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark (local copy of its public release); "
                       "resumable, sharded under torchrun; --compare: accuracy against cost of several runs")
    p.add_argument("--model", default=None, help="checkpoint folder")
    p.add_argument("--task", default=None, help=f"one of {sorted(TASKS)}")
    p.add_argument("--data", default=None, help="the benchmark's files (parquet file or folder, JSON, V* folder)")
    p.add_argument("--method", choices=sorted(METHODS), default=None)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--task-option", "-t", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. -t ocr=true (textvqa)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="the first N questions only")
    p.add_argument("--out", required=True, help="run folder (predictions, results); with --compare: where the "
                   "table, JSON and plots go")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN", help="finished eval runs to compare")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from loupe.evaluation import EvalSpec, compare, results_table, run_eval

    if args.compare:
        print(compare([Path(r) for r in args.compare], Path(args.out))["table"], end="")
        print(f"table, JSON and plots (accuracy against FLOPs per task) in {args.out}")
        return 0
    missing = [f"--{k}" for k in ("model", "task", "data") if getattr(args, k) is None]
    if missing:
        raise LoupeError(f"loupe eval needs {', '.join(missing)} (or --compare RUN...)")
    spec = EvalSpec(str(Path(args.model).resolve()), args.task, str(Path(args.data).resolve()), args.method,
                    parse_options(args.option), parse_options(args.task_option), args.limit)
    try:
        summary = run_eval(spec, args.out, batch_size=args.batch_size, device=args.device,
                           dtype=DTYPES[args.dtype] if args.dtype else None)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary is not None:
        print(results_table([summary]), end="")
        print(f"predictions and results.json in {args.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a training checkpoint -> a Hugging Face folder (weights, config, tokenizer)")
    p.add_argument("checkpoint", help="RUN/checkpoint-N")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from loupe.runs import export

    folder = export(Path(args.checkpoint), Path(args.out), overwrite=args.overwrite)
    print(f"exported {args.checkpoint} to {folder}")
    return 0


def _add_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="visor: build the router's pseudo-labels and train the router")
    router = p.add_subparsers(title="router commands")
    for name, run, what in (("labels", cmd_router_labels, "score every configuration on every question; the "
                             "labels (cheapest configuration within 99%% of the maximum's score) as JSON"),
                            ("train", cmd_router_train, "train the router on the labels (or build them first)")):
        q = router.add_parser(name, help=what)
        q.add_argument("--model", required=name == "labels", help="a universally trained visor checkpoint")
        q.add_argument("--data", required=name == "labels", help="LLaVA-format JSON: every turn is one routing "
                       "sample")
        q.add_argument("--out", required=True, help="labels JSON file" if name == "labels" else "router folder")
        q.add_argument("--device", default="cpu")
        q.add_argument("--score", choices=["exact", "likelihood"], default="exact",
                       help="per-sample score of a configuration: exact match, or the answer's probability")
        q.add_argument("--all-samples", action="store_true",
                       help="let every sample teach the router, also those the maximum configuration fails "
                            "(default: only those it answers; for the others the 99%% rule is vacuous)")
        q.add_argument("--overwrite", action="store_true")
        if name == "train":
            q.add_argument("--labels", default=None, help="labels from `loupe router labels` (default: build them)")
            q.add_argument("--epochs", type=int, default=None, help="default 300 (or the recipe's)")
            q.add_argument("--seed", type=int, default=None)
            q.add_argument("--recipe", default=None, help="a router recipe (e.g. visor-ov-0.5b-router)")
            q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="router recipe overrides")
        q.set_defaults(run=run)


def cmd_router_labels(args: argparse.Namespace) -> int:
    from loupe.visor_train import router_data, write_router_labels

    check_writable(args.out, "--out")

    rd = router_data(args.model, args.data, args.device)
    table = write_router_labels(rd, args.out, args.score, solved_only=not args.all_samples, overwrite=args.overwrite)
    used = [s for s in table["samples"] if s["used"]]
    counts = [sum(1 for s in used if s["label"] == c) for c in range(len(table["configurations"]))]
    print(f"{len(rd.ids)} questions, {len(used)} teach the router; their labels per configuration "
          f"{dict(zip(map(str, table['configurations']), counts, strict=True))}; written to {args.out}")
    return 0


def cmd_router_train(args: argparse.Namespace) -> int:
    from loupe.recipe import load_recipe, required, with_overrides
    from loupe.visor_train import router_data, train_router_from

    recipe = load_recipe(args.recipe, kind="router") if args.recipe else {}
    given = {k: getattr(args, k) for k in ("model", "data", "epochs", "seed") if getattr(args, k) is not None}
    if args.all_samples:
        given["all_samples"] = True
    r = with_overrides({"epochs": 300, "seed": 0, "score": args.score, **recipe, **given}, args.overrides, "router")
    name = f"recipe {args.recipe}" if args.recipe else "this command"
    for key in ("epochs", "seed"):
        if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < (1 if key == "epochs" else 0):
            raise LoupeError(f"{key}={r[key]!r} must be an integer of at least {1 if key == 'epochs' else 0}")
    report = train_router_from(router_data(required(r, "model", name), required(r, "data", name), args.device),
                               args.out, args.labels, int(r["epochs"]), int(r["seed"]), str(r["score"]),
                               solved_only=not r.get("all_samples", False), overwrite=args.overwrite)
    print(f"router for {report.configurations}: {report.samples} samples, labels per configuration "
          f"{report.label_counts}, training accuracy {report.train_accuracy:.1f}%; written to {args.out}")
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train every method on the built-in benchmark; table, JSON, plot")
    p.add_argument("--out", default="loupe-reproduce", help="output folder")
    p.add_argument("--quick", action="store_true", help="the same pipeline, much smaller (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--stage", default="all", metavar="{all,base}",
                   help="all: the whole reproduction; base: only train the base and write its MANIFEST.json "
                        "(the shipped base is made this way)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the base inside the run instead of starting from the shipped one")
    p.add_argument("--base", default=None, metavar="DIR", help="start from this base (made by --stage base)")
    p.add_argument("--base-steps", type=int, default=None,
                   help="with --stage base or --from-scratch: train the base this many steps (default: the plan's)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tune every method this many steps (default: the synth-finetune recipe's)")
    p.add_argument("--resolutions", action="store_true",
                   help="also the resolution ablation: FlexAttention at 2x and 4x the native size")
    p.add_argument("--dense-tower", action="store_true",
                   help="with --stage base or --from-scratch: pretrain the vision tower densely first, then keep it "
                        "frozen (loupe.reproduce.DENSE; not the shipped base's recipe)")
    p.set_defaults(run=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from loupe.reproduce import print_report, reproduce

    report = reproduce(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, stage=args.stage,
                       base=args.base, from_scratch=args.from_scratch, resolutions=args.resolutions,
                       base_steps=args.base_steps, dense_tower=args.dense_tower,
                       finetune_steps=args.finetune_steps)
    if report.get("stage") == "base":
        m = report["manifest"]
        print(f"base in {report['base']} ({m['seconds']:.0f} s on {m['machine'].get('cpu', '?')}); validation "
              f"accuracy easy {m['val_accuracy']['easy']:.1f}, hard {m['val_accuracy']['hard']:.1f}")
        return 0
    print_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
