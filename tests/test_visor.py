"""VISOR against an independent reference written from DESIGN.md section 3, and its
equivalences: zero-gate CA = text-only, all-SA = hd, batched = per sample, cached =
recomputed, routed = its chosen configurations; the router's labels; universal training;
the cost model against the FLOP counter; bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loupe
from loupe.cost import count_flops, estimate
from loupe.errors import ConfigError, LoupeError
from loupe.flops import Workload, decoder_layer
from loupe.generation import SamplingConfig, generate
from loupe.methods import RunOptions, TrainStep, method_options
from loupe.methods.visor import VisorRun
from loupe.nn.decoder import AttnContext
from loupe.nn.rope import Rope
from loupe.tiny import init_random_, tiny_config
from loupe.visor_train import informative, router_labels

CFG = tiny_config(layers=4)  # 56 px native (16 LR tokens), GQA 4/2 heads
HR = 112  # 2 x 2 tiles -> 64 HR tokens: 80 visual tokens per image
PLACE = dict(ca_layers=[0, 2], sa_layers=[1, 3])
SUBSETS = [[], [1], [3], [1, 3]]


def visor(seed: int = 0, gate: float = 0.7, **opts) -> loupe.VLM:
    torch.manual_seed(seed)
    model = loupe.VLM(CFG, method_options("visor", hr_size=HR, **{**PLACE, **opts}))
    init_random_(model, std=0.15)
    model.method.init_from_base(model)
    with torch.no_grad():
        for module in model.method.cross.values():
            module.attn.gate.fill_(gate)
            for lin in (module.attn.q_proj, module.attn.k_proj, module.attn.v_proj, module.attn.o_proj):
                lin.weight.normal_(0, 0.15)
            module.position.weight.normal_(0, 0.3)
        for p in model.method.router.parameters():
            p.normal_(0, 1.0)
    return model.eval()


def request(model: loupe.VLM, lengths: tuple[int, ...] = (9,), seed: int = 1, before: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts with the image block after `before` text tokens; ids, mask, pixels."""
    g = torch.Generator().manual_seed(seed)
    n, t = model.method.tokens_per_image(), max(lengths) + model.method.tokens_per_image()
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, length in enumerate(lengths):
        text = torch.randint(5, 200, (length,), generator=g)
        seq = torch.cat([text[:before], torch.full((n,), CFG.image_token_id), text[before:]])
        ids[row, t - len(seq):], mask[row, t - len(seq):] = seq, 1
    return ids, mask, torch.randn(len(lengths), 3, HR, HR, generator=g)


# ---- the reference: batch 1, no cache, eager, from the paper's equations -----------------------
def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_ca(module, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """t + tanh(g) Wo softmax(q k^T / sqrt(d)) v, keys/values from norm(V) + DWConv7(norm(V))."""
    a, eps, heads = module.attn, CFG.text.rms_norm_eps, CFG.text.num_heads
    h = rms(v, module.visual_norm.weight, eps)  # (Nv, W)
    h = h + F.conv1d(h.T[None], module.position.weight, module.position.bias, padding=3, groups=h.shape[1])[0].T
    q = (rms(t, a.norm.weight, eps) @ a.q_proj.weight.T).view(len(t), heads, -1).transpose(0, 1)
    k = (h @ a.k_proj.weight.T).view(len(h), heads, -1).transpose(0, 1)
    val = (h @ a.v_proj.weight.T).view(len(h), heads, -1).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
    return t + torch.tanh(a.gate) * ((p @ val).transpose(0, 1).reshape(len(t), -1) @ a.o_proj.weight.T)


def reference(model: loupe.VLM, ids: torch.Tensor, px: torch.Tensor, sa: list[int]) -> torch.Tensor:
    """Logits (T, V) of one unpadded prompt: every layer on the text rows, the standard decoder
    layer over the whole sequence at the SA layers of `sa`, CA before the CA layers."""
    dec, method = model.decoder, model.method
    image = ids[0] == CFG.image_token_id
    x = dec.embed_tokens(ids.masked_fill(ids == CFG.image_token_id, 0))[0]
    x[image] = method.encode(model, px).sequence[0]
    pos = torch.arange(len(x))
    rope = Rope.at(pos[None], CFG.text.head_dim, CFG.text.rope_theta, x.dtype)
    text_rope = Rope.at(pos[~image][None], CFG.text.head_dim, CFG.text.rope_theta, x.dtype)
    t, v = x[~image], x[image]
    for i, layer in enumerate(dec.layers):
        if str(i) in method.cross:
            t = reference_ca(method.cross[str(i)], t, v)
        if i in sa:
            full = torch.empty_like(x)
            full[~image], full[image] = t, v
            full = layer(full[None], AttnContext(rope, None, True, "eager"))[0]
            t, v = full[~image], full[image]
        else:
            t = layer(t[None], AttnContext(text_rope, None, True, "eager"))[0]
    full = torch.empty_like(x)
    full[~image], full[image] = t, v
    return dec.logits(full)


@pytest.mark.parametrize("sa", SUBSETS)
@torch.no_grad()
def test_every_configuration_matches_the_reference(sa: list[int]) -> None:
    model = visor()
    ids, _, px = request(model)
    out = model(ids, px, run=VisorRun(configurations=[sa]))
    torch.testing.assert_close(out.logits[0], reference(model, ids, px, sa), rtol=1e-4, atol=1e-4)
    assert out.report.sa_layers.tolist() == [len(sa)]


@torch.no_grad()
def test_text_only_layers_leave_the_visual_stream_untouched() -> None:
    model = visor()
    ids, _, px = request(model)
    image = ids[0] == CFG.image_token_id
    seen: list[torch.Tensor] = []
    model.decoder.norm.register_forward_hook(lambda m, args, out: seen.append(args[0][0]))
    model(ids, px, run=VisorRun(configurations=[[]]))
    assert torch.equal(seen[-1][image], model.method.encode(model, px).sequence[0])  # never updated
    model(ids, px, run=VisorRun(configurations=[[1]]))
    before = seen[-1]
    for p in model.decoder.layers[2].parameters():  # a text-only layer here
        p.data.add_(0.5)
    for p in model.decoder.layers[3].parameters():  # an SA layer the configuration skips
        p.data.add_(0.5)
    model(ids, px, run=VisorRun(configurations=[[1]]))
    after = seen[-1]
    assert torch.equal(after[image], before[image])
    assert not torch.allclose(after[~image], before[~image])


@torch.no_grad()
def test_zero_gate_cross_attention_is_the_text_only_layer() -> None:
    with_ca = visor(gate=0.0)
    without = loupe.VLM(CFG, method_options("visor", hr_size=HR, ca_layers=[], sa_layers=[1, 3])).eval()
    without.load_state_dict({k: v for k, v in with_ca.state_dict().items() if not k.startswith("method.")},
                            strict=False)
    without.method.route_token.data.copy_(with_ca.method.route_token)
    ids, _, px = request(with_ca)
    for sa in SUBSETS:
        run = VisorRun(configurations=[sa])
        torch.testing.assert_close(with_ca(ids, px, run=run).logits, without(ids, px, run=run).logits, rtol=0, atol=0)
    opened = visor(gate=0.7)
    run = VisorRun(configurations=[[1]])
    assert not torch.allclose(opened(ids, px, run=run).logits, with_ca(ids, px, run=run).logits, atol=1e-3)


@torch.no_grad()
def test_every_layer_sa_without_ca_is_hd() -> None:
    model = visor(ca_layers=[], sa_layers=[0, 1, 2, 3])
    hd = loupe.VLM(CFG, method_options("hd", hr_size=HR, tiles=True)).eval()
    hd.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("method.")})
    ids, mask, px = request(model, lengths=(9, 5), before=1)
    torch.testing.assert_close(model(ids, px, mask).logits, hd(ids, px, mask).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_mixed_batch_equals_each_sample_alone() -> None:
    model = visor()
    ids, mask, px = request(model, lengths=(9, 4, 7, 6))
    configs = [[], [1], [3], [1, 3]]
    batched = model(ids, px, mask, run=VisorRun(configurations=configs))
    assert batched.report.sa_layers.tolist() == [0, 1, 1, 2]
    for row, sa in enumerate(configs):
        keep = mask[row].bool()
        alone = model(ids[row:row + 1, keep], px[row:row + 1], run=VisorRun(configurations=[sa]))
        torch.testing.assert_close(batched.logits[row, keep], alone.logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def spread_router(model: loupe.VLM, ids, mask, px) -> None:
    """Centre the router's logits on this batch, so its samples pick different configurations."""
    states = model.method.routing_states(model, input_ids=ids, pixel_values=px, attention_mask=mask)
    model.method.router.fc2.bias.sub_(model.method.router(states).mean(0))


def greedy_recompute(model: loupe.VLM, ids, mask, px, steps: int, run: VisorRun | None = None) -> torch.Tensor:
    out = []
    for _ in range(steps):
        tok = model(ids, px, mask, run=run).logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
    return torch.cat(out, 1)


@torch.no_grad()
def test_cached_generation_equals_recomputation_mixed_and_routed() -> None:
    model = visor()
    ids, mask, px = request(model, lengths=(9, 4, 7))
    sampling = SamplingConfig(max_new_tokens=6)
    configs = [[1, 3], [], [3]]
    forced = VisorRun(configurations=configs)
    cached = generate(model, ids, px, mask, sampling=sampling, run=forced)
    assert torch.equal(cached, greedy_recompute(model, ids, mask, px, 6, forced))
    calls: list[int] = []
    for module in model.method.cross.values():  # count CA key/value projections
        module.keys_values = (lambda f: lambda v: calls.append(1) or f(v))(module.keys_values)
    generate(model, ids, px, mask, sampling=sampling)
    assert len(calls) == len(model.method.ca_layers)  # once per CA layer per request, not per token
    spread_router(model, ids, mask, px)
    reports: list = []
    routed = generate(model, ids, px, mask, sampling=sampling, run=VisorRun(configuration="router"),
                      on_report=reports.append)
    chosen = [model.method.configurations[c] for c in reports[0].route.tolist()]
    assert len({tuple(c) for c in chosen}) > 1, "the test wants a batch the router splits"
    assert torch.equal(routed, greedy_recompute(model, ids, mask, px, 6, VisorRun(configurations=chosen)))


@torch.no_grad()
def test_the_routing_row_changes_no_output() -> None:
    model = visor(configuration="router")
    ids, mask, px = request(model, lengths=(9, 4, 7, 8), seed=3)
    spread_router(model, ids, mask, px)
    routed = model(ids, px, mask)
    chosen = [model.method.configurations[c] for c in routed.report.route.tolist()]
    forced = model(ids, px, mask, run=VisorRun(configurations=chosen))
    assert len({tuple(c) for c in chosen}) > 1
    torch.testing.assert_close(routed.logits, forced.logits, rtol=0, atol=0)
    states = model.method.routing_states(model, input_ids=ids, pixel_values=px, attention_mask=mask)
    assert torch.equal(model.method.router(states).argmax(-1), routed.report.route)


def test_router_labels_follow_the_99_percent_rule() -> None:
    scores = torch.tensor([[0.2, 0.5, 0.995, 1.0],  # 0.995 >= 0.99 x 1.0
                           [0.0, 0.0, 0.0, 0.0],  # the maximum scores nothing: the cheapest will do
                           [1.0, 1.0, 1.0, 1.0],
                           [0.1, 0.98, 0.5, 1.0],  # 98% is not enough: only the maximum
                           [0.7, 0.9, 0.8, 0.8]])  # above the maximum counts
    assert router_labels(scores).tolist() == [2, 0, 0, 3, 1]
    assert informative(scores).tolist() == [True, False, True, True, True]  # the maximum answers it
    with pytest.raises(LoupeError, match="non-negative"):
        router_labels(-scores)


@torch.no_grad()
def test_only_questions_the_maximum_answers_teach_the_router() -> None:
    from loupe.visor_train import fit_router
    model = visor()
    scores = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    states = torch.randn(4, CFG.text.hidden_size)
    ids = [(f"q{i}", "hard") for i in range(4)]
    report, table = fit_router(model, ids, scores, states)
    assert [s["used"] for s in table["samples"]] == [True, False, True, False]
    assert report.samples == 2 and report.label_counts == [1, 1, 0]
    report, _ = fit_router(model, ids, scores, states, solved_only=False)
    assert report.samples == 4 and report.label_counts == [3, 1, 0]
    with pytest.raises(LoupeError, match="no sample teaches the router"):
        fit_router(model, ids, torch.zeros(4, 3), states)


def test_universal_training_draws_only_viable_configurations() -> None:
    viable = [[], [3], [1, 3]]
    model = visor(configurations=viable, configuration="sample").train()
    ids, mask, px = request(model)
    gen = torch.Generator().manual_seed(0)
    drawn = set()
    for step in range(30):
        draw = model.method.on_train_step(TrainStep(step, 0.0, gen))
        index = int(draw.label)
        drawn.add(index)
        sa = model(ids, px, mask, run=draw.run).report.sa[0].nonzero()[:, 0].tolist()
        assert sa == viable[index]
    assert drawn == {0, 1, 2}
    model.eval()
    assert model(ids, px, mask).report.sa[0].nonzero()[:, 0].tolist() == [1, 3]  # inference: the maximum
    assert model.method.options.configuration == "sample"  # drawing changed no option


@pytest.mark.parametrize("configuration, front", [("max", None), ("min", None), (1, None), ("router", None),
                                                   ("max", 0.5), ("min", 0.25)])
@torch.no_grad()
def test_prefill_and_decode_flops_match_the_counter(configuration, front) -> None:
    model = visor(configuration=configuration, visionzip=front)
    ids, _, px = request(model, lengths=(23,))
    cache = model.new_cache(1, ids.shape[1] + 2)
    out: dict = {}
    prefill = count_flops(lambda: out.update(r=model(ids, px, cache=cache, last_only=True)))
    tok = out["r"].logits[:, -1].argmax(-1, keepdim=True)
    decode = count_flops(lambda: model(tok, cache=cache, last_only=True))
    mix = None
    if configuration == "router":
        mix = [0.0] * len(model.method.configurations)
        mix[int(out["r"].report.route)] = 1.0
    cost = estimate(CFG, model.method.options, Workload(23, new_tokens=2, mix=mix))
    assert cost.prefill == prefill
    assert cost.decode_per_token == decode


@torch.no_grad()
def test_visionzip_front_end_is_visionzip_on_every_crop() -> None:
    """VISOR + token reduction: the visual stream is VisionZip's tokens of the LR image and of
    each HR tile (in that order), and the layers run over it exactly as the reference says."""
    from loupe.methods.highres import low_res, tiles
    from loupe.methods.visionzip import VisionZipConfig, zipped_tokens
    model = visor(visionzip=0.5)
    assert model.method.tokens_per_image() == 5 * 8  # LR + 2 x 2 tiles, 8 of 16 tokens each (7 + 1)
    ids, _, px = request(model, lengths=(9,))
    crops = [low_res(px, 56)] + list(tiles(px, 56).split(1))
    expected = torch.cat([zipped_tokens(model, c, VisionZipConfig(ratio=0.5)) for c in crops], dim=1)
    torch.testing.assert_close(model.method.encode(model, px).sequence, expected, rtol=1e-5, atol=1e-6)
    for sa in ([], [1, 3]):
        out = model(ids, px, run=VisorRun(configurations=[sa])).logits[0]
        torch.testing.assert_close(out, reference(model, ids, px, sa), rtol=1e-4, atol=1e-5)
    label = loupe.methods.method_label(model.method.options, CFG)
    assert label == "visor@112 [max, visionzip 0.5 (7+1)]"
    with pytest.raises(ConfigError, match="visor's visionzip front end: ratio=1.5"):
        method_options("visor", hr_size=HR, visionzip=1.5).validate(CFG)


def test_cost_of_budgets_and_a_mix() -> None:
    options = method_options("visor", hr_size=HR, **PLACE)
    costs = [estimate(CFG, method_options("visor", hr_size=HR, configuration=k, **PLACE), Workload(20))
             for k in range(3)]
    assert costs[0].part("prefill.llm") < costs[1].part("prefill.llm") < costs[2].part("prefill.llm")
    mixed = estimate(CFG, method_options("visor", hr_size=HR, configuration="router", **PLACE),
                     Workload(20, mix=(0.5, 0.0, 0.5)))
    expected = (costs[0].part("prefill.llm") + costs[2].part("prefill.llm")) / 2
    routing_row = decoder_layer(CFG.text, 21, 21) - decoder_layer(CFG.text, 20, 20)  # layer 0, before SA layer 1
    assert mixed.part("prefill.llm") == pytest.approx(expected + routing_row, rel=1e-9)
    hd = estimate(CFG, method_options("hd", hr_size=HR, tiles=True), Workload(20))
    assert costs[-1].part("prefill.llm") < hd.part("prefill.llm")
    with pytest.raises(LoupeError, match="mix"):
        estimate(CFG, method_options("visor", hr_size=HR, configuration="router", **PLACE), Workload(20))
    assert options.resolved_configurations(CFG) == [[], [1], [1, 3]]


@pytest.mark.parametrize("opts, match", [
    (dict(ca_layers=[0, 7]), r"ca_layers=\[0, 7\] names layer\(s\) \[7\] out of range"),
    (dict(sa_layers=[-1, 2]), r"sa_layers=\[-1, 2\] names layer\(s\) \[-1\]"),
    (dict(ca_layers=[1], sa_layers=[1, 3]), r"layer\(s\) \[1\] are both CA and SA"),
    (dict(configurations=[[], [2]]), r"configuration \[2\] is not a subset of the selectable SA layers \[1, 3\]"),
    (dict(ca_layers=3), r"ca_layers=3 in visor's options: expected a list of integers or null"),
    (dict(configurations=[1, 3]), r"configurations=\[1, 3\] in visor's options: expected a list of lists of integers"),
    (dict(configuration="fastest"), r"configuration='fastest'"),
    (dict(configuration=5), r"configuration=5"),
])
def test_bad_placements_and_configurations(opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        loupe.VLM(CFG, method_options("visor", hr_size=HR, **{**PLACE, **opts}))


@torch.no_grad()
def test_bad_configurations_images_and_routers(tmp_path: Path) -> None:
    from loupe.visor_train import RouterReport, load_router, save_router
    model = visor()
    ids, mask, px = request(model, lengths=(9, 5))
    with pytest.raises(ConfigError, match=r"configuration \[0, 1\] is not a subset"):
        model(ids, px, mask, run=VisorRun(configurations=[[0, 1]]))
    with pytest.raises(LoupeError, match="3 configurations given for a batch of 2"):
        model(ids, px, mask, run=VisorRun(configurations=[[], [1], [3]]))
    with pytest.raises(LoupeError, match="takes VisorRun run options"):
        model(ids, px, mask, run=RunOptions())
    with pytest.raises(LoupeError, match="needs an image"):
        model(ids[:, -3:])
    with pytest.raises(LoupeError, match="exactly one image per sample"):
        block = torch.full((80,), CFG.image_token_id)
        two = torch.cat([torch.tensor([5, 6]), block, torch.tensor([7]), block, torch.tensor([8])])
        model(torch.stack([two, torch.full_like(two, 9)]), px)
    other = visor(configurations=[[], [3], [1, 3]])
    save_router(other, tmp_path / "router", RouterReport(other.method.configurations, 0, [], 0.0, 0, 0.0))
    with pytest.raises(LoupeError, match=r"trained for configurations \[\[\], \[3\], \[1, 3\]\], but this model "
                                         r"has \[\[\], \[1\], \[1, 3\]\]"):
        load_router(model, tmp_path / "router")
    assert model.method.options.configuration == "max"  # nothing changed
    wide = visor(router_hidden=16)
    save_router(wide, tmp_path / "wide", RouterReport(wide.method.configurations, 0, [], 0.0, 0, 0.0))
    with pytest.raises(LoupeError, match="do not fit this model's router"):
        load_router(model, tmp_path / "wide")
    with pytest.raises(LoupeError, match="not a router folder"):
        load_router(model, tmp_path)


# ---- conversion and the command line ---------------------------------------------------------
@torch.no_grad()
def test_convert_from_llava_adds_nothing_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import save_hf_llava

    from loupe.cli import main
    src, dst = tmp_path / "llava", tmp_path / "visor"
    save_hf_llava(src, text_num_hidden_layers=4, text_num_key_value_heads=2)
    assert main(["convert", str(src), str(dst), "--method", "visor", "-o", "hr_size=112"]) == 0
    converted = loupe.from_pretrained(dst)
    assert converted.method.options.to_dict()["name"] == "visor"
    assert (converted.method.ca_layers, converted.method.sa_layers) == ([0], [1])  # L/3 of 4 layers
    assert all(float(m.attn.gate) == 0 for m in converted.method.cross.values())
    bare = loupe.from_pretrained(src, "visor", hr_size=112, ca_layers=[], sa_layers=[1])
    ids = torch.cat([torch.tensor([[1, 7]]), torch.full((1, 80), 127), torch.tensor([[9, 10, 11]])], 1)
    px = torch.randn(1, 3, HR, HR, generator=torch.Generator().manual_seed(0))
    for sa in ([], [1]):
        run = VisorRun(configurations=[sa])
        torch.testing.assert_close(converted(ids, px, run=run).logits, bare(ids, px, run=run).logits, rtol=0, atol=0)
    assert main(["convert", str(src), str(tmp_path / "bad"), "--method", "visor", "-o", "ca_layers=[0,9]"]) == 2
    assert "ca_layers=[0, 9] names layer(s) [9] out of range: the model has 4 decoder layers" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_flops_reports_every_budget_at_7371_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """OneVision-0.5B at its largest AnyRes image (2304 x 2304): 729 + 81 x 82 = 7,371 tokens."""
    import json

    from loupe.cli import main
    assert main(["flops", "--preset", "llava-ov-0.5b", "--method", "visor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_tokens"] == 7371
    rows = out["budgets"]["budgets"]
    assert [r["budget"] for r in rows][:2] == ["SA none", "SA 1"] and len(rows) == 9  # 8 SA layers of 24
    savings = [r["llm_saving"] for r in rows]
    assert savings == sorted(savings, reverse=True) and savings[-1] > 1
    assert out["budgets"]["reference"]["image_tokens"] == 7371
    assert main(["flops", "--preset", "llava-ov-0.5b", "--method", "visor", "-o", "configuration=router",
                 "--mix", "0.5,0.5"]) == 2
    assert "a mix of 2 fractions for 9 configurations" in capsys.readouterr().err


def test_viable_search_keeps_the_best_subset_of_each_size() -> None:
    from loupe.visor_train import best_per_size
    table = {(): 30.0, (1,): 41.0, (3,): 44.0, (5,): 38.0, (1, 3): 47.0, (1, 5): 45.0, (3, 5): 49.0,
             (1, 3, 5): 50.0}
    seen: list[tuple[int, ...]] = []

    def score(subset: tuple[int, ...]) -> float:
        seen.append(subset)
        return table[subset]

    assert best_per_size([5, 1, 3], score) == [(), (3,), (3, 5), (1, 3, 5)]  # exhaustive
    assert set(seen) == set(table)
    seen.clear()
    assert best_per_size([1, 3, 5], score, exhaustive=2) == [(), (3,), (3, 5), (1, 3, 5)]  # greedy elimination
    assert (1, 5) in seen and (5,) in seen and (1,) not in seen  # only the children of the kept subsets
