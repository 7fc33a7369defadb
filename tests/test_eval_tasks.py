"""`loupe eval`: every task on fixture files in its release's schema, the official metrics on
hand-made cases, resumable and sharded runs equal to uninterrupted ones, and the comparison."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import loupe
from loupe.cli import main
from loupe.errors import LoupeError
from loupe.tasks import TASKS, metrics, task
from loupe.tiny import write_tiny_checkpoint

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")


# ---- the metrics, on hand-made cases ---------------------------------------------------------
def test_vqa_accuracy_normalises_like_evalai_and_leaves_one_out() -> None:
    assert metrics.normalise_answer("The Dog.") == "dog"
    assert metrics.normalise_answer("Two dogs!") == "2 dogs"
    assert metrics.normalise_answer("1,000") == "1000"
    assert metrics.normalise_answer("dont") == "don't" and metrics.normalise_answer("couldnt've") == "couldn't've"
    answers = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2"s leaves 2 matches (2/3); leaving out a "3" leaves 3 (1)
    assert metrics.vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert metrics.vqa_accuracy("3", answers) == 1.0
    assert metrics.vqa_accuracy("four", answers) == 0.0
    assert metrics.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_anls_threshold_and_normalisation() -> None:
    assert metrics.anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert metrics.anls("  Hello   World ", ["hello world"]) == 1.0
    assert metrics.anls("ab", ["ac"]) == pytest.approx(0.5)  # distance 1 / 2: on the threshold, kept
    assert metrics.anls("abc", ["axy"]) == 0.0  # 2 / 3 > 0.5: zero
    assert metrics.anls("abc", ["xyz", "abd"]) == pytest.approx(1 - 1 / 3)  # the closest answer counts


def test_relaxed_accuracy_5_percent_rule() -> None:
    assert metrics.relaxed_accuracy("10.4", "10") == 1.0 and metrics.relaxed_accuracy("10.6", "10") == 0.0
    assert metrics.relaxed_accuracy("50%", "0.5") == 1.0  # a trailing % divides by 100
    assert metrics.relaxed_accuracy("0.0", "0") == 0.0  # a zero target falls back to exact match
    assert metrics.relaxed_accuracy(" Yes ", "yes") == 1.0 and metrics.relaxed_accuracy("no", "yes") == 0.0


def test_magnifierbench_parses_as_its_authors_do() -> None:
    q = "What colour is the car? A. red, B. blue, C. green, D. white."
    for said, letter in (("The answer is C.", "C"), ("B", "B"), ("I think A red one", "A"),  # any capital A-D
                         ("it is green", "C"), ("white", "D"), ("it is a car", "A"), ("yes", "other"), ("b", "B")):
        assert metrics.magnifier_letter(said, q) == letter, said


def test_option_letters_and_yes_no() -> None:
    opts = ["dog", "cat", "bird"]
    for said, letter in (("B", "B"), ("(B) cat", "B"), ("C.", "C"), ("The answer is A", "A"), ("a cat", "B"),
                         ("dog or cat", None), ("D", None)):
        assert metrics.option_letter(said, opts) == letter, said
    assert metrics.yes_no("No, there is not.") == "no" and metrics.yes_no("Yes.") == "yes"
    assert metrics.yes_no("There is no dog") == "no" and metrics.yes_no("Yes. No.") == "yes"  # first sentence


# ---- fixtures in the releases' schemas -------------------------------------------------------
def png(seed: int, size: tuple[int, int] = (60, 45)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (37 * seed % 255, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def fixtures(root: Path) -> dict[str, Path]:
    img = lambda k: {"bytes": png(k), "path": f"{k}.png"}  # noqa: E731  (the datasets' Image struct)
    paths = {
        "textvqa": write_parquet(root / "textvqa" / "validation-00000-of-00001.parquet", [
            {"image_id": f"i{k}", "question_id": k, "question": "what is written?", "image": img(k),
             "answers": ["stop"] * 7 + ["stop sign"] * 3, "ocr_tokens": ["STOP"], "set_name": "val"}
            for k in range(3)]),
        "docvqa": write_parquet(root / "docvqa" / "validation.parquet", [
            {"questionId": k, "question": "what is the date?", "question_types": ["form"], "image": img(k),
             "docId": k, "answers": ["1 May", "May 1"]} for k in range(3)]),
        "chartqa": write_parquet(root / "chartqa" / "test.parquet", [
            {"type": t, "question": "how many?", "answer": "12", "image": img(k)}
            for k, t in enumerate(["human_test", "augmented_test", "human_test"])]),
        "pope": write_parquet(root / "pope" / "test.parquet", [
            {"id": k, "question_id": str(k), "question": "Is there a dog in the image?", "answer": a,
             "image_source": "x", "image": img(k), "category": c}
            for k, (a, c) in enumerate([("yes", "random"), ("no", "popular"), ("no", "adversarial")])]),
        "mmbench": write_parquet(root / "mmbench" / "dev.parquet", [
            {"index": k, "question": "Which animal?", "hint": "nan" if k else "A farm.", "A": "dog", "B": "cat",
             "C": "cow", "D": "nan", "answer": "B", "category": "animals", "image": img(k), "source": "x",
             "l2-category": "y", "split": "dev"} for k in range(3)]),
        "scienceqa_img": write_parquet(root / "scienceqa" / "test.parquet", [
            {"image": img(k) if k < 2 else None, "question": "Which is a mammal?", "choices": ["frog", "whale"],
             "answer": 1, "hint": "", "subject": "natural science"} for k in range(3)]),
    }
    write_parquet(root / "gqa" / "testdev_balanced_instructions" / "a.parquet", [
        {"id": f"q{k}", "imageId": f"n{k % 2}", "question": "What colour is it?", "answer": "blue",
         "fullAnswer": "It is blue."} for k in range(3)])
    write_parquet(root / "gqa" / "testdev_balanced_images" / "a.parquet",
                  [{"id": f"n{k}", "image": img(k)} for k in range(2)])
    paths["gqa"] = root / "gqa"
    for category in ("direct_attributes", "relative_position"):
        folder = root / "vstar" / category
        folder.mkdir(parents=True)
        for k in range(2):
            Image.open(io.BytesIO(png(k))).convert("RGB").save(folder / f"{k}.jpg")
            (folder / f"{k}.json").write_text(json.dumps({"question": "What is the colour of the cup?",
                                                          "options": ["red", "blue", "green", "white"],
                                                          "target_object": ["cup"], "bbox": [[1, 2, 3, 4]]}))
    paths["vstar"] = root / "vstar"
    write_parquet(root / "magnifier" / "data" / "test-00000-of-00001.parquet", [  # Otter-AI/MagnifierBench
        {"id": f"m{k}", "instruction": "What is on the sign? A. stop, B. go, C. yield, D. exit", "images": [img(k)],
         "answer": "A"} for k in range(3)])
    paths["magnifierbench"] = root / "magnifier"
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fixtures(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "llava")


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"synth"}))
def test_every_task_runs_on_its_release_format(name: str, data: dict[str, Path], tiny: Path, tmp_path: Path) -> None:
    assert main(["eval", "--model", str(tiny), "--task", name, "--data", str(data[name]), "--out",
                 str(tmp_path / "run"), "--batch-size", "2"]) == 0
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    t = task(name)
    expected = {"scienceqa_img": 2, "gqa": 3, "vstar": 4}.get(name, 3)  # ScienceQA-IMG: rows with an image
    assert summary["n"] == expected and 0 <= summary["scores"][t.metric] <= 100
    assert summary["flops_per_sample"] > 0 and summary["seconds_per_sample"] > 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "predictions.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == expected and all("output" in r for r in rows)
    if name == "vstar":  # both protocols, the likelihood one from the option losses
        assert set(summary["scores"]) == {"likelihood_accuracy", "letter_accuracy"}
        assert all(len(r["option_losses"]) == 4 for r in rows)
        assert set(summary["by_category"]) == {"direct_attributes", "relative_position"}
    if name == "pope":
        assert {"precision", "recall", "f1", "yes_ratio"} <= set(summary["scores"])


@torch.no_grad()
def test_option_likelihood_is_the_mean_cross_entropy_of_the_option(data: dict[str, Path], tiny: Path) -> None:
    from loupe.chat import template_for
    from loupe.evaluation import Asker

    model = loupe.from_pretrained(tiny)
    tok = loupe.Tokenizer.from_folder(tiny, model.cfg.image_token_id)
    t = task("vstar")
    item = t.read(data["vstar"])[0]
    asker = Asker(model, tok, template_for(model.cfg), t, {})
    images = model.prepare_images([item.picture()])
    losses = asker.option_losses([item], images)[0]
    prompt = asker.prompts([item], images.tokens)[0]
    for option, loss in zip(item.options, losses, strict=True):
        reply = tok.encode(asker.chat.reply(option), add_bos=False)
        ids = torch.tensor([prompt + reply])
        logits = model(ids, images.pixel_values, image_sizes=images.image_sizes).logits[0]  # (T, V)
        want = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], ids[0, len(prompt):])
        assert loss == pytest.approx(float(want), rel=1e-4)


def test_bad_data_and_options_are_named(data: dict[str, Path], tiny: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(tmp_path / "bad.parquet", [{"question": "q", "image": {"bytes": png(0), "path": None}}])
    with pytest.raises(LoupeError, match=r"row 0 of .*bad.parquet: missing \['question_id', 'answers'\] - not the "
                                         r"lmms-lab/textvqa schema"):
        task("textvqa").read(tmp_path / "bad.parquet")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mb.json").write_text(json.dumps([{"id": "x", "images": ["nope.png"], "answer": "A",
                                                          "instruction": "Q? A. a, B. b, C. c, D. d"}]))
    with pytest.raises(LoupeError, match=r"row 0 of .*mb.json: image not found: .*nope.png"):
        task("magnifierbench").read(tmp_path / "m")
    (tmp_path / "m" / "mb.json").write_text(json.dumps([{"image": "a.png", "question": "q", "answer": "A"}]))
    with pytest.raises(LoupeError, match=r"missing \['id', 'instruction', 'images'\] - not the Otter-AI/Magnifier"):
        task("magnifierbench").read(tmp_path / "m")
    with pytest.raises(LoupeError, match=r"unknown task 'vqav9'; Loupe evaluates \[.*'textvqa'"):
        task("vqav9")
    assert main(["eval", "--model", str(tiny), "--task", "docvqa", "--data", str(data["docvqa"]), "--out",
                 str(tmp_path / "r"), "-t", "ocr=true"]) == 2
    assert "task 'docvqa' takes no option(s) ['ocr']" in capsys.readouterr().err


def test_an_interrupted_run_resumes_to_the_same_summary(data: dict[str, Path], tiny: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import loupe.evaluation as E

    args = ["eval", "--model", str(tiny), "--task", "textvqa", "--data", str(data["textvqa"]), "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = E.answer_batch, []

    def dies(asker, items):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(asker, items)

    monkeypatch.setattr(E, "answer_batch", dies)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    preds = tmp_path / "cut" / "predictions.rank0.jsonl"
    assert len(preds.read_text().splitlines()) == 2 and not (tmp_path / "cut" / "results.json").exists()
    with open(preds, "a") as f:
        f.write('{"id": "2", "outp')  # a line the kill cut in half
    monkeypatch.setattr(E, "answer_batch", real)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    whole, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    for key in ("n", "scores", "by_category", "flops_per_sample"):
        assert whole[key] == cut[key]
    outputs = lambda d: sorted((r["id"], r["output"]) for r in map(json.loads, (tmp_path / d /  # noqa: E731
                                                                               "predictions.rank0.jsonl").open()))
    assert outputs("whole") == outputs("cut")
    # the same --out for another method is refused
    assert main([*args, "--out", str(tmp_path / "cut"), "--method", "hd"]) == 2


def test_two_processes_give_the_single_process_results(data: dict[str, Path], tiny: Path, tmp_path: Path) -> None:
    args = ["eval", "--model", str(tiny), "--task", "pope", "--data", str(data["pope"]), "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "loupe", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "two").glob("predictions.rank*.jsonl"))) == 2  # each rank its share
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["scores"] == two["scores"] and one["n"] == two["n"] == 3


def test_compare_draws_accuracy_against_cost(data: dict[str, Path], tiny: Path, tmp_path: Path) -> None:
    for method in ("lowres", "hd"):
        extra = ["-o", "hr_size=112"] if method == "hd" else []
        assert main(["eval", "--model", str(tiny), "--method", method, *extra, "--task", "chartqa", "--data",
                     str(data["chartqa"]), "--out", str(tmp_path / method)]) == 0
    assert main(["eval", "--compare", str(tmp_path / "lowres"), str(tmp_path / "hd"), "--out",
                 str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "lowres" in table and "hd(hr_size=112)" in table
    assert (tmp_path / "cmp" / "compare-chartqa.png").stat().st_size > 0
    summaries = json.loads((tmp_path / "cmp" / "compare.json").read_text())["summaries"]
    assert summaries[1]["flops_per_sample"] > summaries[0]["flops_per_sample"]  # HD pays for its tiles


def test_onevision_batched_equals_per_sample_on_images_of_different_sizes(tmp_path: Path) -> None:
    """AnyRes gives each size its own token count: a left-padded batch answers and ranks options as one
    question at a time does (the option losses are continuous, so this is a sharp check)."""
    ov = write_tiny_checkpoint(tmp_path / "ov", onevision=True)
    folder = tmp_path / "vstar" / "direct_attributes"
    folder.mkdir(parents=True)
    for k, size in enumerate([(60, 45), (120, 40), (33, 90), (64, 64)]):
        Image.open(io.BytesIO(png(k, size))).convert("RGB").save(folder / f"{k}.jpg")
        (folder / f"{k}.json").write_text(json.dumps({"question": "What is the colour of the cup?",
                                                      "options": ["red", "blue", "green", "white"]}))
    args = ["eval", "--model", str(ov), "--task", "vstar", "--data", str(tmp_path / "vstar")]
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "batched")]) == 0
    assert main([*args, "--batch-size", "1", "--out", str(tmp_path / "single")]) == 0
    rows = {d: {r["id"]: r for r in map(json.loads, (tmp_path / d / "predictions.rank0.jsonl").open())}
            for d in ("batched", "single")}
    assert len(rows["batched"]) == 4
    for qid, row in rows["single"].items():
        assert rows["batched"][qid]["output"] == row["output"], qid
        assert rows["batched"][qid]["option_losses"] == pytest.approx(row["option_losses"], rel=1e-4), qid
        assert rows["batched"][qid]["flops"] == pytest.approx(row["flops"])
    assert len({round(r["flops"]) for r in rows["single"].values()}) > 1  # each image's own AnyRes grid


def test_vstar_reads_both_releases_and_letters_are_not_always_a(tmp_path: Path, data: dict[str, Path]) -> None:
    # SEAL's folders put the correct option first; the letter protocol must not reward "always A"
    folder = tmp_path / "seal" / "direct_attributes"
    folder.mkdir(parents=True)
    for k in range(40):
        (folder / f"{k}.jpg").write_bytes(b"")  # only the reader runs here
        (folder / f"{k}.json").write_text(json.dumps({"question": "Colour?", "options": ["red", "blue", "green",
                                                                                        "white"]}))
    items = task("vstar").read(tmp_path / "seal")
    assert all(i.options[metrics.LETTERS.index(i.answers[0])] == "red" for i in items)  # still the right one
    assert sorted(i.answers[0] for i in items) != ["A"] * 40 and len({i.answers[0] for i in items}) == 4
    # lmms-lab/vstar-bench: options inside `text`, the letter in `label`
    write_parquet(tmp_path / "hub" / "test.parquet", [
        {"image": {"bytes": png(0), "path": None}, "question_id": 7, "category": "relative_position",
         "text": "Is the cup on the left or right of the dog?\n(A) left\n(B) right\nAnswer with the option's letter "
                 "from the given choices directly.", "label": "B"}])
    (item,) = task("vstar").read(tmp_path / "hub")
    assert (item.question, item.options, item.answers, item.category) == (
        "Is the cup on the left or right of the dog?", ["left", "right"], ["B"], "relative_position")
    write_parquet(tmp_path / "bad" / "test.parquet", [{"image": {"bytes": png(0), "path": None}, "text": "Q? (A) x",
                                                       "label": "C"}])
    with pytest.raises(LoupeError, match=r"row 0 of .*test.parquet: its text does not list options"):
        task("vstar").read(tmp_path / "bad")
