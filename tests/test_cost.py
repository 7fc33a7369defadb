"""The analytic cost model against torch's FlopCounterMode on real forwards of every method."""

from __future__ import annotations

import pytest
import torch

import loupe
from loupe.cost import PRESETS, count_flops, estimate, measured_selection
from loupe.flops import Workload
from loupe.methods import MethodReport, method_options
from loupe.tiny import tiny_config

TEXT = 23  # prompt text tokens besides the image tokens
CFG = tiny_config(layers=4)  # GQA: 4 query heads, 2 key/value heads; 56 px -> 16 image tokens

METHODS = {
    "lowres": {},
    "hd": {},  # one interpolated pass at 70 px -> 25 HR tokens
    "hd-tiles": {"tiles": True, "hr_size": 112},
    "xattn": {"hr_size": 168},
    "flexattn": {"hr_size": 168, "pool": 4, "memoise": False},  # attnmap, measured selection
    "flexattn-center": {"hr_size": 168, "pool": 4, "strategy": "center", "ablation_ratio": 0.3},
    # every text row after the image sees HR at prefill: S is the union of their selections
    "flexattn-text": {"hr_size": 168, "pool": 4, "memoise": False, "hr_rows": "text"},
    "fastv": {"k": 2, "ratio": 0.5},
    "fastv-mean": {"k": 1, "keep": 5, "rank_by": "mean"},
    "pdrop": {"layers": [1, 3], "ratio": 0.5},
    "visionzip": {"dominant": 6, "contextual": 3},
    "visionzip-ratio": {"ratio": 0.5, "keep_class": False},
    "hired": {"rate": 0.3},
    "sparsevlm": {"layers": [0, 2], "keep": [9, 5]},
    "sparsevlm-preset": {"retain": 64},
    # over LLaVA-HD's tiled sequence (VISOR's comparison): the LR image + 2 x 2 native tiles
    "fastv-hd": {"hr_size": 112, "keep": 20},
    "pdrop-hd": {"hr_size": 112, "layers": [1, 3]},
    "sparsevlm-hd": {"hr_size": 112, "layers": [0, 2], "ratios": [0.5, 0.25]},
    "visionzip-hd": {"hr_size": 112, "dominant": 6, "contextual": 3},
    "hired-hd": {"hr_size": 112, "rate": 0.3},
}


def build(key: str, seed: int = 0) -> loupe.VLM:
    torch.manual_seed(seed)
    options = method_options(key.split("-")[0], **METHODS[key])
    model = loupe.VLM(CFG, options).eval()
    with torch.no_grad():
        for p in model.method.parameters():
            p.normal_(0, 0.1)  # open XAttn's gate; any weights do for counting
    return model


def request(model: loupe.VLM, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(5, 200, (batch, TEXT), generator=g)
    image = torch.full((batch, model.method.tokens_per_image()), CFG.image_token_id)
    ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    size = model.method.image_size()
    return ids, torch.randn(batch, 3, size, size, generator=g)


def mean_fraction(report: MethodReport) -> float:
    return measured_selection(report) or 0.1


def close(analytic: float, counted: int) -> None:
    assert counted > 0
    assert abs(analytic - counted) <= 0.01 * counted, f"analytic {analytic:.6g} vs counted {counted}"


@pytest.mark.parametrize("key", list(METHODS))
@torch.no_grad()
def test_prefill_and_decode_step_match_flop_counter(key: str) -> None:
    model = build(key)
    ids, px = request(model)
    cache = model.new_cache(1, ids.shape[1] + 2)
    out: dict = {}
    counted_prefill = count_flops(lambda: out.update(r=model(ids, px, cache=cache, last_only=True)))
    frac = mean_fraction(out["r"].report)
    tok = out["r"].logits[:, -1].argmax(-1, keepdim=True)
    counted_decode = count_flops(lambda: out.update(d=model(tok, cache=cache, last_only=True)))
    memoised = key == "flexattn-center"  # the center selection repeats: a memoised step projects nothing
    question = TEXT - 3  # the text after the image (SparseVLM's raters)
    prefill = estimate(CFG, model.method.options, Workload(TEXT, new_tokens=1, selected=frac, memoised=memoised,
                                                           question_tokens=question))
    decode_frac = mean_fraction(out["d"].report)
    decode = estimate(CFG, model.method.options, Workload(TEXT, new_tokens=2, selected=decode_frac,
                                                          memoised=memoised, question_tokens=question))
    close(prefill.prefill, counted_prefill)
    close(decode.decode_per_token, counted_decode)
    close(decode.part("decode"), counted_decode)


@pytest.mark.parametrize("key", ["lowres", "flexattn"])
@torch.no_grad()
def test_all_position_logits_and_batch(key: str) -> None:
    """lm_head over every position, a batch of 2, and the eager kernel count the same."""
    model = build(key).set_kernel("eager")
    ids, px = request(model, batch=2)
    out: dict = {}
    counted = count_flops(lambda: out.update(r=model(ids, px)))
    frac = mean_fraction(out["r"].report)
    cost = estimate(CFG, model.method.options, Workload(TEXT, batch=2, selected=frac, lm_head="all"))
    close(cost.prefill, counted)


def test_presets_give_the_published_numbers() -> None:
    """LLaVA-1.5-7B at 576 image tokens: the 3.82 'TFLOPs' of the token-pruning papers."""
    cfg = PRESETS["llava-1.5-7b"].config
    lowres = estimate(cfg, method_options("lowres"), convention="image-macs")
    assert lowres.total == pytest.approx(3.817e12, rel=1e-3)
    assert lowres.equivalent_image_tokens == pytest.approx(576)
    hd = estimate(cfg, method_options("hd"), convention="image-macs")
    assert hd.equivalent_image_tokens == pytest.approx(576 + 1024)
    flex = estimate(cfg, method_options("flexattn"))
    assert flex.image_tokens == 576 and 576 < flex.equivalent_image_tokens < 700
    assert flex.total < 0.6 * estimate(cfg, method_options("hd")).total


def test_token_reduction_papers_figures() -> None:
    """PyramidDrop's LLaVA-1.5-7B table (3.82 T vanilla, 1.78 T at lambda 0.5 with its default
    stages 8/16/24) in its 3ndm image-token count; FastV's "45% fewer FLOPs" for LLaVA-1.5-13B
    at K=2, R=50% in its own formula (2ndm, n = the whole prompt): 45% with the ~35 text tokens of
    LLaVA-1.5's system prompt and question, 48% over the image tokens alone."""
    seven, thirteen = PRESETS["llava-1.5-7b"].config, PRESETS["llava-1.5-13b"].config
    assert estimate(seven, method_options("pdrop"), convention="image-macs").total == pytest.approx(1.78e12, rel=3e-3)

    def saving(cfg: object, text: int, convention: str) -> float:
        w = Workload(prompt_tokens=text)
        fastv = estimate(cfg, method_options("fastv", k=2, ratio=0.5), w, convention=convention).total
        return 1 - fastv / estimate(cfg, method_options("lowres"), w, convention=convention).total

    assert saving(thirteen, 35, "fastv-macs") == pytest.approx(0.45, abs=0.005)
    assert saving(thirteen, 35, "image-macs") == pytest.approx(0.48, abs=0.005)  # image tokens only: text ignored
    assert saving(thirteen, 0, "fastv-macs") == pytest.approx(0.48, abs=0.005)
    fastv = estimate(seven, method_options("fastv", k=2, ratio=0.5), Workload(prompt_tokens=0), convention="fastv-macs")
    from loupe.flops import image_token_macs
    t = seven.text  # 2 layers at 576 tokens, 30 at 288, FastV's 2ndm
    assert fastv.total == pytest.approx(2 * image_token_macs(t, 576, 2) + 30 * image_token_macs(t, 288, 2))
    assert fastv.equivalent_image_tokens == pytest.approx(
        estimate(seven, method_options("fastv", k=2, ratio=0.5)).equivalent_image_tokens)  # one axis for all


def test_decode_grows_with_new_tokens_and_memo_saves_projection() -> None:
    cfg, opts = PRESETS["llava-1.5-7b"].config, method_options("flexattn")
    one = estimate(cfg, opts, Workload(new_tokens=2))
    many = estimate(cfg, opts, Workload(new_tokens=11))
    assert many.part("decode") > 9.9 * one.part("decode")  # 10 steps, each over more keys
    assert many.prefill == one.prefill
    reproject = estimate(cfg, opts, Workload(new_tokens=11, memoised=False))
    assert reproject.parts["decode.hr_projection"] > 0 == many.parts["decode.hr_projection"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=-1), "prompt_tokens=-1"),
    (dict(new_tokens=-3), "new_tokens=-3"),
    (dict(selected=0.0), "selected ratio 0.0"),
    (dict(selected=1.5), "selected ratio 1.5"),
    (dict(batch=0), "batch=0"),
])
def test_bad_workloads(kwargs: dict, match: str) -> None:
    with pytest.raises(loupe.LoupeError, match=match):
        Workload(**kwargs)


def test_bad_presets_methods_sizes() -> None:
    from loupe.cost import preset
    with pytest.raises(loupe.LoupeError, match="unknown preset 'llava-9b'.*llava-1.5-7b"):
        preset("llava-9b")
    with pytest.raises(loupe.ConfigError, match="hr_size=1000 must be a multiple"):
        estimate(PRESETS["llava-1.5-7b"].config, method_options("flexattn", hr_size=1000))
    with pytest.raises(loupe.LoupeError, match="unknown convention 'macs'"):
        estimate(CFG, method_options("lowres"), convention="macs")


# ---- the command line ---------------------------------------------------------------------
def test_cli_flops_json_and_compare(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from loupe.cli import main
    assert main(["flops", "--preset", "llava-1.5-7b", "--method", "flexattn@1008", "--new-tokens", "4",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    want = estimate(PRESETS["llava-1.5-7b"].config, method_options("flexattn", hr_size=1008),
                    Workload(64, new_tokens=4))
    assert d["total"] == pytest.approx(want.total) == pytest.approx(sum(d["parts"].values()))
    assert main(["flops", "--preset", "llava-1.5-7b", "--compare", "lowres", "hd@448", "flexattn",
                 "--convention", "image-macs"]) == 0
    out = capsys.readouterr().out
    assert "| lowres | 576 | 576 |" in out and "| hd@448 | 1600 | 1600 |" in out and "flexattn@1008" in out


def test_cli_flops_takes_a_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from loupe.cli import main
    from loupe.tiny import write_tiny_checkpoint
    folder = write_tiny_checkpoint(tmp_path / "tiny")
    assert main(["flops", "--model", str(folder), "--json", "--prompt-tokens", "10"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = loupe.from_pretrained(folder).cfg
    assert d["total"] == pytest.approx(estimate(cfg, method_options("lowres"), Workload(10, new_tokens=8)).total)


def test_cli_bench_writes_table_and_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from loupe.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--methods", "lowres", "flexattn@112", "-o", "pool=4",
                 "--reps", "2", "--new-tokens", "3", "--dtype", "float32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert [r["method"] for r in d["rows"]] == ["lowres", "flexattn@112"]
    flex = d["rows"][1]
    assert flex["selected_fraction"] == pytest.approx(0.1, abs=0.1)  # the fixed budget
    assert flex["prefill_ratio_predicted"] > 1 and d["rows"][0]["prefill_ratio_measured"] == 1
    assert flex["prefill_ms"]["min"] <= flex["prefill_ms"]["median"] <= flex["prefill_ms"]["max"]
    assert "| flexattn@112 |" in printed


@pytest.mark.parametrize("argv, match", [
    (["flops", "--preset", "llava-9b"], "unknown preset 'llava-9b'; choose one of"),
    (["flops", "--preset", "tiny", "--method", "magic"], "unknown method 'magic'; choose one of"),
    (["flops", "--preset", "llava-1.5-7b", "--method", "xattn@1000"], "hr_size=1000 must be a multiple"),
    (["flops", "--preset", "tiny", "--method", "flexattn", "--selected-ratio", "0"], "selected ratio 0.0"),
    (["flops", "--preset", "tiny", "--new-tokens", "-1"], "new_tokens=-1"),
    (["flops", "--preset", "tiny", "--method", "lowres@112"], "takes no HR size"),
    (["bench", "--preset", "llava-ov-0.5b", "--image-size", "300x0"], "image size '300x0' is not HEIGHTxWIDTH"),
    (["bench", "--preset", "tiny", "--reps", "0"], "reps=0"),
])
def test_cli_cost_bad_input(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loupe.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err
