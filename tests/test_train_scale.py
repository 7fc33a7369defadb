"""Training at scale on this CPU: the shared chat template, lazy data, scored-row LM head,
accumulation, activation checkpointing, bf16, DDP and FSDP2 (two gloo processes under
torchrun), exact resume from DCP checkpoints, export, recipes and the memory estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loupe
from loupe.chat import template_for
from loupe.cli import main
from loupe.data.batches import StepPlan, collate, tokenize
from loupe.data.llava import Example, read_llava
from loupe.data.synthetic import write_dataset
from loupe.distributed import World, check_parallel
from loupe.errors import LoupeError
from loupe.tiny import write_tiny_checkpoint
from loupe.train import FromDisk, TrainConfig, train

WORKER = Path(__file__).with_name("train_worker.py")
STEPS = ["--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2",
         "--train", "vision_tower,projector,decoder"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("d") / "synth", 4, seed=5, progress=False)


@pytest.fixture(scope="module")
def base(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loupe.reproduce import dataset_tokenizer, synth_tiny_config
    from loupe.tiny import init_random_

    root = tmp_path_factory.mktemp("m")
    tok = dataset_tokenizer(read_llava(synth / "train.json"), root / "tokenizer")
    torch.manual_seed(0)
    model = init_random_(loupe.VLM(synth_tiny_config(tok.inner.get_vocab_size())))
    loupe.save_pretrained(model, root / "base", files=[root / "tokenizer" / "tokenizer.json"])
    return root / "base"


def cli(base: Path, synth: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(base), "--data", str(synth / "train.json"), "--out", str(out), *STEPS, *extra]


def torchrun(args: list[str], interrupt_at: int | None = None, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if interrupt_at is not None:
        env["LOUPE_TEST_INTERRUPT_AT"] = str(interrupt_at)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hang takes the workers down too
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- one template for training and generation --------------------------------------------------
@pytest.mark.parametrize("onevision", [False, True])
def test_trained_ids_are_the_ids_generation_builds(tmp_path: Path, onevision: bool) -> None:
    folder = write_tiny_checkpoint(tmp_path / "m", onevision=onevision)
    model = loupe.from_pretrained(folder)
    tok = loupe.Tokenizer.from_folder(folder, model.cfg.image_token_id)
    template = template_for(model.cfg)
    turns = [("What is in the image? <image>", "A red circle."), ("Where is the triangle?", "left")]
    ids, scored = template.conversation(turns, tok, 9)
    first = scored.index(True)
    assert template.prompt_ids(turns[0][0], tok, 9) == ids[:first]  # what `loupe generate` asks
    assert (template.system is not None) == (not onevision)  # LLaVA-1.5's vicuna line; none for OneVision
    end = tok.inner.token_to_id(template.ends_reply)
    replies = [tok.inner.decode([i for i, s in zip(ids, scored, strict=True) if s and i != end])]
    assert replies[0].replace(" ", "") == "Aredcircle.left"
    assert sum(i == end for i, s in zip(ids, scored, strict=True) if s) == 2  # each answer's end is scored
    text_only, _ = template.conversation([("Hello?", "Hi.")], tok, image=False)
    assert model.cfg.image_token_id not in text_only


def test_text_only_and_multi_turn_rows_train_and_long_rows_are_refused_at_load(synth: Path, base: Path,
                                                                              tmp_path: Path) -> None:
    rows = json.loads((synth / "train.json").read_text())
    text = {"id": "t0", "conversations": [{"from": "human", "value": "Is this text only?"},
                                          {"from": "gpt", "value": "yes"},
                                          {"from": "human", "value": "Really?"}, {"from": "gpt", "value": "no"}]}
    (tmp_path / "images").symlink_to(synth / "images")
    (tmp_path / "mix.json").write_text(json.dumps([*rows[:3], text]))
    examples = read_llava(tmp_path / "mix.json")
    assert examples[-1].image is None and len(examples[-1].turns) == 2
    model = loupe.from_pretrained(base)
    tok = loupe.Tokenizer.from_folder(base, model.cfg.image_token_id)
    samples, paths = tokenize(examples, tok, model)
    assert samples[-1].image is None and len(paths) == len({e.image for e in examples[:3]})
    batch = collate(samples, tok.pad_id)
    assert len(batch.images) == 3  # only the rows with an image index one
    log = train(model, FromDisk(samples, paths, model, tok.pad_id), TrainConfig(steps=2, batch_size=4, log_every=1),
                progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    longest = max(len(s.ids) for s in samples)
    with pytest.raises(LoupeError, match=rf"row \d+ \(id '.*'\) is {longest} tokens .* maximum length {longest - 1}"):
        tokenize(examples, tok, model, max_length=longest - 1)


def test_onevision_trains_on_images_of_different_sizes(tmp_path: Path) -> None:
    from PIL import Image

    folder = write_tiny_checkpoint(tmp_path / "ov", onevision=True)
    model = loupe.from_pretrained(folder, "hd", dtype=torch.float32)  # OneVision's AnyRes
    tok = loupe.Tokenizer.from_folder(folder, model.cfg.image_token_id)
    examples = []
    for k, (w, h) in enumerate([(60, 40), (40, 90), (84, 84), (50, 50)]):
        Image.new("RGB", (w, h), (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
        examples.append(Example(str(k), tmp_path / f"{k}.png", [("<image>\nWhat is in the image?", "A red circle.")]))
    samples, paths = tokenize(examples, tok, model)
    counts = {sum(i == model.cfg.image_token_id for i in s.ids) for s in samples}
    assert len(counts) > 1  # AnyRes: the count follows each image's size
    log = train(model, FromDisk(samples, paths, model, tok.pad_id, workers=1),
                TrainConfig(steps=2, batch_size=2, log_every=1, train=("projector", "decoder")), progress=False)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


# ---- memory and speed seams --------------------------------------------------------------------
def test_logit_rows_are_the_full_logits_at_those_rows(tmp_path: Path) -> None:
    model = loupe.from_pretrained(write_tiny_checkpoint(tmp_path / "m"))
    ids = torch.randint(5, 200, (2, 12))
    rows = torch.zeros(2, 12, dtype=torch.bool)
    rows[0, [3, 7]] = rows[1, [11]] = True
    full = model(ids).logits
    assert torch.allclose(model(ids, logit_rows=rows).logits, full[rows], atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(base: Path, synth: Path) -> None:
    from loupe.distributed import enable_activation_checkpointing
    from loupe.memory import saved_bytes

    grads, saved = [], []
    for checkpointed in (False, True):
        model = loupe.from_pretrained(base).train()
        if checkpointed:
            enable_activation_checkpointing(model, vision=True)
        tok = loupe.Tokenizer.from_folder(base, model.cfg.image_token_id)
        samples, paths = tokenize(read_llava(synth / "train.json")[:2], tok, model)
        batch, pics = next(FromDisk(samples, paths, model, tok.pad_id).loader([[0, 1]]))
        from loupe.train import loss_sum

        saved.append(saved_bytes(lambda b=batch, p=pics, m=model: loss_sum(m, m, b, p), model.parameters()))
        loss_sum(model, model, batch, pics).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0]) < 1e-5
    assert saved[1] < 0.5 * saved[0]  # it keeps layer inputs only


def test_memory_formula_matches_what_autograd_saves() -> None:
    from loupe.config import TextConfig
    from loupe.memory import decoder_layer_bytes, saved_bytes
    from loupe.nn.decoder import AttnContext, DecoderLayer
    from loupe.nn.rope import Rope

    for width, ffn, kv in ((64, 160, 2), (128, 384, 4)):
        t = TextConfig(vocab_size=100, hidden_size=width, intermediate_size=ffn, num_layers=1, num_heads=4,
                       num_kv_heads=kv, head_dim=width // 4)
        layer, tokens = DecoderLayer(t), 2 * 40
        x = torch.randn(2, 40, width, requires_grad=True)
        ctx = AttnContext(Rope.at(torch.arange(40)[None].expand(2, -1), width // 4, 1e4, torch.float32), None, True)
        measured = saved_bytes(lambda: layer(x, ctx), layer.parameters()) / tokens
        rope = 2 * (width // 4) * 4  # cos and sin, shared by every layer
        assert measured == pytest.approx(decoder_layer_bytes(t, 4) + rope, rel=0.01)
        layer.checkpointed = True
        assert saved_bytes(lambda: layer(x, ctx), layer.parameters()) / tokens == 4 * width


def test_accumulation_bf16_and_fused_adamw_match_one_fp32_batch(base: Path, synth: Path, tmp_path: Path) -> None:
    runs = {}
    grounded = ["grounding=1", "grounding_layers=[1,2]"]  # `loupe.grounding`: normalised per grounded row
    for name, extra in (("one", []), ("accumulated", ["--micro-batch-size", "1"]), ("bf16", ["--precision", "bf16"]),
                        ("fused", ["fused_adamw=true"]), ("grounded", grounded),
                        ("grounded-accumulated", [*grounded, "--micro-batch-size", "1"])):
        assert main(cli(base, synth, tmp_path / name, "--steps", "2", *extra)) == 0
        runs[name] = [json.loads(r) for r in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert runs["accumulated"][-1]["loss"] == pytest.approx(runs["one"][-1]["loss"], rel=1e-5)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "accumulated")) < 1e-5
    assert runs["bf16"][-1]["loss"] == pytest.approx(runs["one"][-1]["loss"], rel=0.02)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "fused")) < 1e-5  # torch's fused AdamW kernel
    g, g_acc = runs["grounded"][-1], runs["grounded-accumulated"][-1]
    assert g["grounding"] == pytest.approx(g_acc["grounding"], rel=1e-5) and g["grounding"] > 0
    assert max_diff(weights(tmp_path / "grounded"), weights(tmp_path / "grounded-accumulated")) < 1e-5
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "grounded")) > 1e-4  # the loss moved the weights


# ---- resume, export -------------------------------------------------------------------------------
def test_killed_and_resumed_equals_uninterrupted_bit_for_bit(base: Path, synth: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import loupe.train as T

    assert main(cli(base, synth, tmp_path / "whole")) == 0
    real = T.Trainer.step

    def killed(self, k, parts, epoch):  # type: ignore[no-untyped-def]
        if k == 3:
            raise KeyboardInterrupt
        return real(self, k, parts, epoch)

    monkeypatch.setattr(T.Trainer, "step", killed)
    assert main(cli(base, synth, tmp_path / "cut", "--keep-last", "1")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loupe: interrupted at step 3 of 4;") and "checkpoint-2" in err[-1]
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(T.Trainer, "step", real)
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-4"]  # keep_last 1
    # a resume that changes what the run is
    assert main(["train", "--resume", str(tmp_path / "cut"), "--method", "hd"]) == 2
    assert "method: None -> 'hd'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "cut"), "lr=0.5"]) == 2
    assert "lr: 0.001 -> 0.5" in capsys.readouterr().err
    # export: a Hugging Face folder that loads and generates
    assert main(["export", str(tmp_path / "cut" / "checkpoint-4"), str(tmp_path / "export")]) == 0
    assert all(torch.equal(load_file(tmp_path / "export" / "model.safetensors")[k], b[k]) for k in b)
    ex = read_llava(synth / "test.json")[0]
    assert main(["generate", "--model", str(tmp_path / "export"), "--image", str(ex.image), "--prompt",
                 "Where is it?", "--max-new-tokens", "2"]) == 0


def test_exported_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = write_tiny_checkpoint(tmp_path / "m")
    examples = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"},
                                                    {"from": "gpt", "value": "A red circle."}]}] * 2
    from PIL import Image

    Image.new("RGB", (70, 50), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps(examples))
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "r"),
                 "--steps", "2", "--batch-size", "2", "--checkpoint-every", "2"]) == 0
    assert main(["export", str(tmp_path / "r" / "checkpoint-2"), str(tmp_path / "hf")]) == 0
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    ours = load_file(tmp_path / "r" / "final" / "model.safetensors")
    state = hf.state_dict()
    assert torch.equal(state["model.language_model.layers.0.mlp.up_proj.weight"],
                       ours["language_model.model.layers.0.mlp.up_proj.weight"])


def test_a_failed_save_keeps_the_previous_checkpoint(base: Path, synth: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import loupe.runs

    real = loupe.runs.dcp.save
    calls = []

    def full_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loupe.runs.dcp, "save", full_disk)
    assert main(cli(base, synth, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert err.strip().endswith("the last complete checkpoint is " + str(tmp_path / "r" / "checkpoint-2"))
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(loupe.runs.dcp, "save", real)
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0  # and it resumes from there


# ---- two processes ------------------------------------------------------------------------------
def test_ddp_and_fsdp_steps_equal_the_single_process_step(base: Path, synth: Path, tmp_path: Path) -> None:
    assert main(cli(base, synth, tmp_path / "single")) == 0
    for parallel in ("ddp", "fsdp"):
        done = torchrun(cli(base, synth, tmp_path / parallel, "--parallel", parallel))
        assert done.returncode == 0, done.stderr[-3000:]
        single = json.loads((tmp_path / "single" / "train_log.jsonl").read_text().splitlines()[-1])
        other = json.loads((tmp_path / parallel / "train_log.jsonl").read_text().splitlines()[-1])
        assert other["loss"] == pytest.approx(single["loss"], rel=1e-6)
        assert max_diff(weights(tmp_path / "single"), weights(tmp_path / parallel)) < 1e-4  # float summation order


def test_ddp_with_grounding_equals_the_single_process_step(base: Path, synth: Path, tmp_path: Path) -> None:
    """The grounding loss is normalised by the grounded rows of the global batch (`loupe.grounding`)."""
    grounded = ["grounding=1", "grounding_layers=[1,2]"]
    assert main(cli(base, synth, tmp_path / "single", *grounded)) == 0
    done = torchrun(cli(base, synth, tmp_path / "ddp", "--parallel", "ddp", *grounded))
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = (json.loads((tmp_path / name / "train_log.jsonl").read_text().splitlines()[-1])
                   for name in ("single", "ddp"))
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert ddp["grounding"] == pytest.approx(single["grounding"], rel=1e-5) and single["grounding"] > 0
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "ddp")) < 1e-4


def test_two_process_resume_is_exact_and_reshards(base: Path, synth: Path, tmp_path: Path) -> None:
    whole = torchrun(cli(base, synth, tmp_path / "whole", "--parallel", "ddp"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = torchrun(cli(base, synth, tmp_path / "cut", "--parallel", "ddp"), interrupt_at=3)
    assert cut.returncode != 0 and "interrupted at step 3 of 4" in cut.stderr
    again = torchrun(["train", "--resume", str(tmp_path / "cut")])
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, two processes
    # FSDP2 shards written by two processes, resumed by one
    sharded = torchrun(cli(base, synth, tmp_path / "sharded", "--parallel", "fsdp"), interrupt_at=3)
    assert "interrupted at step 3 of 4" in sharded.stderr
    assert main(["train", "--resume", str(tmp_path / "sharded"), "--parallel", "none"]) == 0
    assert max_diff(a, weights(tmp_path / "sharded")) < 1e-4


def test_bad_distributed_settings_are_named() -> None:
    with pytest.raises(LoupeError, match="batch_size=4 .* does not divide over 3 processes"):
        TrainConfig(batch_size=4).micro_size(World(0, 3, 0, True))
    with pytest.raises(LoupeError, match="micro_batch_size=3 does not divide the 4 samples"):
        TrainConfig(batch_size=8, micro_batch_size=3).micro_size(World(0, 2, 0, True))
    with pytest.raises(LoupeError, match="--parallel fsdp needs several processes: run under torchrun"):
        check_parallel("fsdp", World())
    with pytest.raises(LoupeError, match="2 processes were launched but parallel='none'"):
        check_parallel("none", World(0, 2, 0, True))
    with pytest.raises(LoupeError, match="fewer than one batch of 8"):
        StepPlan(5, 8, 0)


def test_step_plan_is_a_function_of_seed_and_step_and_groups_lengths() -> None:
    plan = StepPlan(40, 8, seed=3)
    assert plan.global_batch(7) == StepPlan(40, 8, seed=3).global_batch(7)  # no state carried between steps
    epoch = sorted(i for s in range(5) for i in plan.global_batch(s))
    assert epoch == list(range(40))  # an epoch visits every sample once
    lengths = [int(x) for x in torch.randint(10, 500, (800,), generator=torch.Generator().manual_seed(0))]
    grouped, plain = StepPlan(800, 8, 0, lengths), StepPlan(800, 8, 0)

    def padding(p: StepPlan) -> float:
        return sum(max(lengths[i] for i in p.global_batch(s)) * 8 - sum(lengths[i] for i in p.global_batch(s))
                   for s in range(p.batches_per_epoch))

    assert padding(grouped) < 0.2 * padding(plain)
    assert plan.rank_batches(2, 1, 2, 2) == [plan.global_batch(2)[4:6], plan.global_batch(2)[6:8]]


# ---- recipes, the dry run ---------------------------------------------------------------------
def test_every_shipped_recipe_reads_and_overrides_apply() -> None:
    from loupe.recipe import load_recipe, shipped, train_config, with_overrides

    names = shipped()
    assert {"flexattn-llava-1.5-7b", "visor-ov-0.5b-max", "visor-ov-0.5b-universal", "visor-ov-0.5b-router",
            "synth-base", "synth-finetune"} <= set(names)
    for name in names:
        if name.endswith("-router"):
            router = with_overrides(load_recipe(name, kind="router"), ["epochs=10"], "router")
            assert router["epochs"] == 10 and router["score"] == "exact"
            with pytest.raises(LoupeError, match="is a 'router' recipe; this command takes 'train'"):
                load_recipe(name)
        else:
            train_config(load_recipe(name))
    flex = with_overrides(load_recipe("flexattn-llava-1.5-7b"), ["lr=3e-5", "options.hr_size=672"])
    cfg = train_config(flex)
    assert cfg.lr == 3e-5 and flex["options"]["hr_size"] == 672 and cfg.warmup_ratio == 0.03
    assert cfg.resolved(665_000).steps == 665_000 // 384 and cfg.resolved(665_000).warmup == 52
    with pytest.raises(LoupeError, match=r"unknown recipe key\(s\) \['lrr'\]"):
        with_overrides({}, ["lrr=1"])


def test_train_from_a_recipe_and_the_dry_run(base: Path, synth: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--recipe", "synth-finetune", f"model={base}", f"data={synth / 'train.json'}",
                 "steps=2", "batch_size=4", "--out", str(tmp_path / "r")]) == 0
    spec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert spec["recipe"] == "synth-finetune" and spec["train"]["lr"] == 3e-3 and spec["train"]["steps"] == 2
    capsys.readouterr()
    assert main(["train", "--recipe", "flexattn-llava-1.5-7b", "model=llava-1.5-7b", "data=x.json", "--dry-run",
                 "--nproc", "8"]) == 0
    table = capsys.readouterr().out
    assert "8 process(es), parallel=fsdp: 7.835B parameters (7.532B trained)" in table  # + W'_K, W'_V per HR layer
    assert "activations" in table and table.strip().splitlines()[-1].split()[0] == "total"
    from loupe.cost import PRESETS
    from loupe.memory import estimate
    from loupe.runs import RunSpec

    spec7 = RunSpec("llava-1.5-7b", "flexattn", {"hr_size": 1008})
    fsdp = estimate(PRESETS["llava-1.5-7b"].config, spec7, TrainConfig(parallel="fsdp", batch_size=8,
                                                                          train=("decoder",)), 8, 2048)
    ddp = estimate(PRESETS["llava-1.5-7b"].config, spec7, TrainConfig(parallel="ddp", batch_size=8,
                                                                         train=("decoder",)), 8, 2048)
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8) and fsdp.parameters < ddp.parameters / 4
