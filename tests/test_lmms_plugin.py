"""The lmms-eval plug-in, offline: `lmms-eval --model loupe` end to end on a tiny checkpoint
against two local tasks (a generation task and a multiple-choice task, YAML under
--include_path reading local fixture files). Runs where the optional extra is installed
(`pip install "loupe[lmms-eval]"`; lmms-eval pulls torchvision, which Loupe itself never
needs, so the default test install leaves it out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loupe.tiny import write_tiny_checkpoint

pytest.importorskip("lmms_eval")

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"].lower())}


def choice_results(doc, results):
    # lmms-eval 0.7.x passes every model output through `unwrap_generation_output`, which turns
    # the (loss, is_greedy) pairs of loglikelihood requests into their str(): its built-in
    # multiple-choice scoring then fails to unpack them. Read them back and score as it does
    # (argmin of the returned mean cross-entropies).
    import ast

    losses = [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in results]
    return {"acc": float(min(range(len(losses)), key=losses.__getitem__) == doc["label"])}
'''

GENERATE = '''task: loupe_fixture_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.json
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
'''

CHOICE = '''task: loupe_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.json
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
process_results: !function utils.choice_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def test_lmms_eval_runs_loupe_end_to_end_offline(tmp_path: Path) -> None:
    model = write_tiny_checkpoint(tmp_path / "model")
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    data.mkdir()
    tasks.mkdir()
    rows_gen, rows_mc = [], []
    for k in range(3):
        Image.new("RGB", (60, 45), (60 * k, 90, 200)).save(data / f"{k}.png")
        rows_gen.append({"image": str(data / f"{k}.png"), "question": "What is in the image?", "answer": "circle"})
        rows_mc.append({"image": str(data / f"{k}.png"), "question": "What colour is the square?",
                        "choices": ["red", "blue", "green"], "label": k})
    (data / "gen.json").write_text(json.dumps(rows_gen))
    (data / "mc.json").write_text(json.dumps(rows_mc))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "gen.yaml").write_text(GENERATE.format(data=data))
    (tasks / "mc.yaml").write_text(CHOICE.format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "loupe", "--model_args", f"pretrained={model}",
           "--tasks", "loupe_fixture_gen,loupe_fixture_mc", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = sorted((tmp_path / "out").rglob("*results*.json"))
    assert found, done.stdout[-2000:]
    results = json.loads(found[-1].read_text())["results"]
    assert 0.0 <= results["loupe_fixture_gen"]["exact,none"] <= 1.0
    assert 0.0 <= results["loupe_fixture_mc"]["acc,none"] <= 1.0


def test_plugin_scores_match_loupe_own(tmp_path: Path) -> None:
    """The plug-in's loglikelihood is Loupe's option likelihood; its batched answers are `generate`'s."""
    from lmms_eval.api.instance import Instance

    from loupe.lmms import LoupeLMM

    model = write_tiny_checkpoint(tmp_path / "model")
    lm = LoupeLMM(pretrained=str(model), batch_size=2)
    pictures = [Image.new("RGB", (60, 45), (60 * k, 90, 200)) for k in range(3)]
    lm.task_dict = {"t": {"test": [{"k": k} for k in range(3)]}}
    visual = lambda doc: [pictures[doc["k"]]]  # noqa: E731
    def request(kind: str, args: tuple, k: int) -> Instance:
        return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": k, "repeats": 1})

    ll = lm.loglikelihood([request("loglikelihood", ("Which colour?", " red", visual, k, "t", "test"), k)
                           for k in range(3)])
    assert all(loss > 0 and isinstance(greedy, bool) for loss, greedy in ll)
    asks = [request("generate_until", ("What is it?", {"max_new_tokens": 3}, visual, k, "t", "test"), k)
            for k in range(3)]
    batched = lm.generate_until(asks)
    one = [lm.generate_until([ask])[0] for ask in asks]
    assert batched == one
