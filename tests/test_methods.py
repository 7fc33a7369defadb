"""FlexAttention, LLaVA-HD and LLaVA-XAttn against independent references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import pixels, prompt_ids

import loupe
from loupe.generation import SamplingConfig, generate
from loupe.methods import ImageInputs, TrainStep
from loupe.methods import selection as S
from loupe.methods.highres import encode_tiled, low_res
from loupe.nn.rope import Rope, rotate_half

HR = 168  # 3 x 56 -> 12 x 12 = 144 HR tokens per image
FLEX = dict(pool=4, first_layer=2)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import save_hf_llava
    path = tmp_path_factory.mktemp("m") / "base"
    save_hf_llava(path, text_num_hidden_layers=4, text_num_key_value_heads=2)
    return path


def flex(base_path: Path, **opts) -> loupe.VLM:
    model = loupe.from_pretrained(base_path, "flexattn", dtype=torch.float32, **{**FLEX, **opts})
    with torch.no_grad():  # make W'_K, W'_V differ from W_K, W_V so HR keys matter on their own
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---- an independent FlexAttention reference (batch 1, eager, no cache, no memo) -------------
def reference_flex(model: loupe.VLM, ids: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Logits (1, T, V), written from DESIGN.md section 2 without the method's code: the HR
    rows are the last row (hr_rows="answer") or every row after the image ("text"), each
    with its own selection."""
    cfg, dec, method = model.cfg, model.decoder, model.method
    g, hr_grid = cfg.vision.grid, HR // cfg.vision.patch_size
    lr = model.image_features(low_res(px, cfg.vision.image_size))
    z = encode_tiled(model, px)[0]  # (M, W)
    image = ids[0] == cfg.image_token_id
    x = dec.embed_tokens(ids.masked_fill(ids == cfg.image_token_id, 0))
    x[0, image] = lr[0]
    t = ids.shape[1]
    pos = torch.arange(t)[None]
    rope = Rope.at(pos, cfg.text.head_dim, cfg.text.rope_theta, x.dtype)
    cols = torch.nonzero(image)[:, 0]
    lr_cos = rope.cos[0, cols].T.reshape(1, -1, g, g)
    lr_sin = rope.sin[0, cols].T.reshape(1, -1, g, g)
    hr_cos = F.interpolate(lr_cos, size=(hr_grid, hr_grid), mode="bicubic", align_corners=False)
    hr_sin = F.interpolate(lr_sin, size=(hr_grid, hr_grid), mode="bicubic", align_corners=False)
    hr_cos, hr_sin = hr_cos[0].flatten(1).T, hr_sin[0].flatten(1).T  # (M, D)
    causal = torch.ones(t, t).tril().bool()
    last_image = int(cols[-1])
    hr_rows = range(last_image + 1, t) if method.options.hr_rows == "text" else [t - 1]
    sel: dict[int, torch.Tensor] = {}  # row -> its selection (M,) for this layer
    for i, layer in enumerate(dec.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = a.qkv(h, rope)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # full map, no HR
        out = probs @ v
        if i >= method.first:
            for r in hr_rows:
                keep = torch.nonzero(sel[r])[:, 0]  # HR tokens row r selected
                zs = z[keep]
                if method.options.hr_norm == "layer":  # RMSNorm on Z with the layer's own (trained) scale
                    norm = method.layers[str(i)].norm
                    zs = norm.weight * (zs * torch.rsqrt(zs.pow(2).mean(-1, keepdim=True) + norm.eps))
                kh = method.layers[str(i)].k_proj(zs).view(len(keep), -1, a.head_dim).transpose(0, 1)
                vh = method.layers[str(i)].v_proj(zs).view(len(keep), -1, a.head_dim).transpose(0, 1)
                kh = kh * hr_cos[keep] + rotate_half(kh) * hr_sin[keep]
                kh, vh = kh.repeat_interleave(groups, 0)[None], vh.repeat_interleave(groups, 0)[None]
                k_all, v_all = torch.cat([k[:, :, : r + 1], kh], 2), torch.cat([v[:, :, : r + 1], vh], 2)
                s_row = (q[:, :, r : r + 1] @ k_all.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                out[:, :, r : r + 1] = s_row.softmax(-1) @ v_all
        x = x + a.o_proj(a.merge(out))
        x = layer.feed_forward(x)
        if i >= method.first - 1:
            for r in hr_rows:
                attn = probs[0, :, r, cols].sum(0).view(1, g, g)
                sel[r] = S.select(attn, torch.ones(1, g, g, dtype=torch.bool), hr_grid=hr_grid, pool=4,
                                  threshold=48.0, strategy="attnmap", budget=None, ablation_ratio=0.1)[0]
    return dec.logits(x)


@pytest.mark.parametrize("hr_norm", ["layer", "none"])
def test_hierarchical_attention_equals_independent_reference(base_path: Path, hr_norm: str) -> None:
    model = flex(base_path, hr_norm=hr_norm)
    ids, px = prompt_ids(10, 16, seed=1), pixels(1, seed=1, size=HR)
    with torch.no_grad():
        out = model(ids, px)
        expected = reference_flex(model, ids, px)[:, -1]
    fractions = out.report.selected_fraction
    assert set(fractions) == {2, 3} and all(0 < float(f) < 1 for f in fractions.values())
    torch.testing.assert_close(out.logits[:, -1], expected, rtol=1e-4, atol=1e-5)
    lowres = loupe.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        plain = lowres(ids, low_res(px, 56)).logits[:, -1]
    assert (plain - expected).abs().max() > 1e-3  # HR really changed the answer row
    torch.testing.assert_close(out.logits[:, :-1], lowres(ids, low_res(px, 56)).logits[:, :-1].detach(),
                               rtol=1e-4, atol=1e-5)  # prompt rows never see HR


def test_text_rows_after_the_image_see_hr_each_with_its_own_selection(base_path: Path) -> None:
    """hr_rows="text": every row after the image is a hierarchical row (the reference's),
    the rows up to the image's end are the base's, and the answer row differs from the
    official method's, whose prompt rows saw no HR."""
    model = flex(base_path, hr_rows="text")
    ids, px = prompt_ids(10, 16, seed=1), pixels(1, seed=1, size=HR)
    after = 2 + 16  # the image block's end
    lowres = loupe.from_pretrained(base_path, dtype=torch.float32)
    official = flex(base_path)
    official.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(ids, px)
        expected = reference_flex(model, ids, px)
        plain = lowres(ids, low_res(px, 56)).logits
        answer_only = official(ids, px).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits[:, :after], plain[:, :after], rtol=1e-4, atol=1e-5)
    assert (out.logits[:, after:-1] - plain[:, after:-1]).abs().amax(-1).min() > 1e-3  # each prompt row moved
    assert (out.logits[:, -1] - answer_only[:, -1]).abs().max() > 1e-3
    sel = out.report.selection[3]  # (1, R, M): one selection per row after the image
    assert sel.shape == (1, ids.shape[1] - after, 144) and len({tuple(r.tolist()) for r in sel[0]}) > 1
    union = sel[0].any(0).float().mean()
    torch.testing.assert_close(out.report.selected_fraction[3], union[None])  # what the layer brings in


def test_training_gate_blends_from_plain_to_hierarchical(base_path: Path) -> None:
    model = flex(base_path)
    ids, px = prompt_ids(10, 16, seed=11), pixels(1, seed=11, size=HR)
    lowres = loupe.from_pretrained(base_path, dtype=torch.float32)
    gen = torch.Generator()

    def at_epoch(epoch: float) -> float:
        model.method.on_train_step(TrainStep(0, epoch, gen))
        return model.method.current_gate()

    with torch.no_grad():
        full = model(ids, px).logits
        assert at_epoch(0.0) == 0.0
        closed = model(ids, px).logits
        assert at_epoch(0.05) == 0.5
        half = model(ids, px).logits
        plain = lowres(ids, low_res(px, 56)).logits
    torch.testing.assert_close(closed, plain, rtol=1e-4, atol=1e-5)  # a = 0: HR has no effect
    assert (half - closed).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    assert at_epoch(3.0) == 1.0
    with pytest.raises(loupe.LoupeError, match="epoch=-1"):
        model.method.gate_at(epoch=-1)


def test_training_gate_survives_save_and_load(base_path: Path, tmp_path: Path) -> None:
    """The gate is a persistent buffer: a checkpoint saved mid-warm-up runs, after loading, with
    the gate it had (and a checkpoint without the buffer, from before it existed, loads at 1)."""
    model = flex(base_path)
    ids, px = prompt_ids(10, 16, seed=11), pixels(1, seed=11, size=HR)
    model.method.on_train_step(TrainStep(0, 0.05, torch.Generator()))
    model.method._training_gate = None  # as after a process restart: only the buffer is left
    with torch.no_grad():
        half = model(ids, px).logits
    loupe.save_pretrained(model, tmp_path / "mid")
    loaded = loupe.from_pretrained(tmp_path / "mid", dtype=torch.float32)
    assert float(loaded.method.gate) == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, px).logits, half, rtol=0, atol=0)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "mid" / "model.safetensors")
    del weights["loupe_method.gate"]
    save_file(weights, tmp_path / "mid" / "model.safetensors", metadata={"format": "pt"})
    assert float(loupe.from_pretrained(tmp_path / "mid", dtype=torch.float32).method.gate) == 1.0


@pytest.mark.parametrize("source", ["official", "paper"])
def test_sdpa_equals_eager(base_path: Path, source: str) -> None:
    model = flex(base_path, source=source)
    ids, px = prompt_ids(10, 16, seed=2), pixels(1, seed=2, size=HR)
    with torch.no_grad():
        fused = model(ids, px).logits
        eager = model.set_kernel("eager")(ids, px).logits
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hr_rows", ["answer", "text"])
def test_batched_equals_per_sample(base_path: Path, hr_rows: str) -> None:
    model = flex(base_path, hr_rows=hr_rows)
    a, b = prompt_ids(4, 16, seed=3, image_at=1), prompt_ids(11, 16, seed=4)
    pad = b.shape[1] - a.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=5, size=HR)
    with torch.no_grad():
        both = model(ids, px, mask)
        one, two = model(a, px[:1]), model(b, px[1:])
    sel = both.report.selection[3]
    assert not torch.equal(sel[0], sel[1])  # different images, different selections
    torch.testing.assert_close(both.logits[0, pad:], one.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.logits[1], two.logits[0], rtol=1e-4, atol=1e-5)
    rows = one.report.selection[3].shape[1]  # a sample's real HR rows are its first slots
    torch.testing.assert_close(both.report.selection[3][0, :rows], one.report.selection[3][0])
    torch.testing.assert_close(both.report.selection[3][1], two.report.selection[3][0])
    for layer, sel in one.report.answer_selection().items():  # the last real row's, padded or not
        torch.testing.assert_close(both.report.answer_selection()[layer][0], sel[0])


def test_text_rows_cached_decoding_equals_recomputing_the_whole_sequence(base_path: Path) -> None:
    """With hr_rows="text" every row after the image sees HR, in a prefill, in each decode step
    and in one uncached forward over prompt + generated tokens alike: the logits agree."""
    model = flex(base_path, hr_rows="text")
    ids, px = prompt_ids(6, 16, seed=6), pixels(1, seed=6, size=HR)
    steps = 5
    with torch.no_grad():
        cache = model.new_cache(1, ids.shape[1] + steps)
        logits = [model(ids, px, cache=cache).logits[:, -1]]
        tokens = []
        for _ in range(steps - 1):
            tokens.append(logits[-1].argmax(-1, keepdim=True))  # (1, 1)
            logits.append(model(tokens[-1], cache=cache).logits[:, -1])
        whole = model(torch.cat([ids, *tokens], 1), px).logits  # no cache
    torch.testing.assert_close(whole[:, ids.shape[1] - 1:], torch.stack(logits, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hr_rows", ["answer", "text"])
def test_memoised_generation_equals_reprojecting(base_path: Path, hr_rows: str) -> None:
    memo, again = flex(base_path, hr_rows=hr_rows), flex(base_path, memoise=False, hr_rows=hr_rows)
    again.load_state_dict(memo.state_dict())
    ids, px = prompt_ids(6, 16, seed=6), pixels(1, seed=6, size=HR)
    cfg = SamplingConfig(max_new_tokens=12)
    fast, slow = generate(memo, ids, px, sampling=cfg), generate(again, ids, px, sampling=cfg)
    assert fast.tolist() == slow.tolist()
    # logits of each step agree too, and memoisation projects fewer HR tokens
    with torch.no_grad():
        caches = [m.new_cache(1, ids.shape[1] + 6) for m in (memo, again)]
        for m, c in zip((memo, again), caches, strict=True):
            m(ids, px, cache=c)
        for tok in fast[0, :5]:
            step = [m(tok.view(1, 1), cache=c).logits[:, -1] for m, c in zip((memo, again), caches, strict=True)]
            torch.testing.assert_close(step[0], step[1], rtol=1e-4, atol=1e-5)
    projected = [c.method_state.projected for c in caches]
    assert projected[0] < projected[1]
    assert projected[0] <= 2 * 144  # each HR token at most once per FlexAttention layer


def test_training_rows_see_hr_and_gradients_reach_new_weights_only(base_path: Path) -> None:
    model = flex(base_path).train()
    model.vision_tower.requires_grad_(False)
    ids, px = prompt_ids(10, 16, seed=7), pixels(1, seed=7, size=HR)
    rows = torch.zeros_like(ids, dtype=torch.bool)
    rows[0, -4:] = True
    out = model(ids, px, loss_rows=rows)
    assert out.report.selection[3].shape == (1, 4, 144)
    out.logits[0, -4:].logsumexp(-1).sum().backward()
    for proj in model.method.layers.values():
        assert proj.k_proj.weight.grad.abs().sum() > 0 and proj.v_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_training_with_text_rows_adds_the_prompt_after_the_image(base_path: Path) -> None:
    model = flex(base_path, hr_rows="text").train()
    ids, px = prompt_ids(10, 16, seed=7), pixels(1, seed=7, size=HR)
    rows = torch.zeros_like(ids, dtype=torch.bool)
    rows[0, -4:] = True
    out = model(ids, px, loss_rows=rows)
    after = ids.shape[1] - (2 + 16)
    assert out.report.selection[3].shape == (1, after, 144)
    assert out.report.hr_rows[0].tolist() == list(range(2 + 16, ids.shape[1]))
    with torch.no_grad():  # training and inference make the same rows hierarchical here
        torch.testing.assert_close(out.logits, model.eval()(ids, px).logits, rtol=1e-4, atol=1e-5)


def test_hd_equals_base_on_the_concatenated_sequence(base_path: Path) -> None:
    hd = loupe.from_pretrained(base_path, "hd", dtype=torch.float32, hr_size=84)  # 6 x 6 = 36 HR tokens
    base = loupe.from_pretrained(base_path, dtype=torch.float32)
    assert hd.method.tokens_per_image() == 16 + 36
    ids, px = prompt_ids(7, 52, seed=8), pixels(1, seed=8, size=84)
    with torch.no_grad():
        lr = base.image_features(low_res(px, 56))
        hr = base.image_features(px)  # one pass, interpolated position embeddings
        expected = base(ids, images=ImageInputs(torch.cat([lr, hr], 1))).logits
        got = hd(ids, px).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    tiled = loupe.from_pretrained(base_path, "hd", dtype=torch.float32, hr_size=112, tiles=True)
    assert tiled.method.tokens_per_image() == 16 + 64


def test_xattn_zero_gate_equals_base_and_gradients_flow(base_path: Path) -> None:
    xattn = loupe.from_pretrained(base_path, "xattn", dtype=torch.float32)
    base = loupe.from_pretrained(base_path, dtype=torch.float32)
    ids, px = prompt_ids(7, 16, seed=9), pixels(1, seed=9, size=HR)
    with torch.no_grad():
        torch.testing.assert_close(xattn(ids, px).logits, base(ids, low_res(px, 56)).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for c in xattn.method.cross:
            c.gate.fill_(0.5)
    xattn.vision_tower.requires_grad_(False)
    out = xattn(ids, px).logits
    assert (out - base(ids, low_res(px, 56)).logits).abs().max() > 1e-3
    out[0, -1].logsumexp(-1).backward()
    for c in xattn.method.cross:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())
    assert all(p.grad is None for p in xattn.vision_tower.parameters())


def test_xattn_cached_generation_equals_recomputation(base_path: Path) -> None:
    model = loupe.from_pretrained(base_path, "xattn", dtype=torch.float32)
    with torch.no_grad():
        for c in model.method.cross:
            c.gate.fill_(0.7)
    ids, px = prompt_ids(6, 16, seed=10), pixels(1, seed=10, size=HR)
    new = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=6))
    with torch.no_grad():
        full = model(torch.cat([ids, new[:, :-1]], 1), px).logits[:, ids.shape[1] - 1:].argmax(-1)
    assert full.tolist() == new.tolist()


@pytest.mark.parametrize(("method", "opts", "match"), [
    ("flexattn", dict(hr_size=100), "hr_size=100 must be a multiple of the encoder's native size 56"),
    ("flexattn", dict(first_layer=4), r"first_layer=4 is out of range: it must be in 1..3"),
    ("flexattn", dict(threshold=300.0), r"threshold=300.0 must be in 0..255"),
    ("flexattn", dict(budget=0.0), r"budget=0.0 must be in \(0, 1\]"),
    ("flexattn", dict(budget=1.5), r"budget=1.5 must be in \(0, 1\]"),
    ("flexattn", dict(strategy="best"), "strategy='best'"),
    ("flexattn", dict(hr_rows="prompt"), r"hr_rows='prompt'; choose one of \['answer', 'text'\]"),
    ("xattn", dict(hr_size=60), "hr_size=60 must be a multiple"),
    ("hd", dict(hr_size=90), "hr_size=90 must be a multiple of the patch size 14"),
])
def test_bad_method_options(base_path: Path, method: str, opts: dict, match: str) -> None:
    full = {**FLEX, **opts} if method == "flexattn" else opts  # pool=4 fits the tiny 4x4 grid
    with pytest.raises(loupe.ConfigError, match=match):
        loupe.from_pretrained(base_path, method, **full)


# ---- the scale of HR keys (DESIGN.md section 2, "Scale") ------------------------------------------
def answer_kl(cfg: loupe.VLMConfig, scale: float, first: int, hr_norm: str, seed: int = 0) -> float:
    """KL (nats) between a freshly converted FlexAttention model's answer distribution with the
    gate fully open and the base model's, when the projector output has RMS ~`scale` (the
    built-in benchmark's base: ~21). HR features: the LR content at 3x, with noise."""
    from loupe.tiny import init_random_
    from loupe.vlm import VLM
    torch.manual_seed(seed)
    base = init_random_(VLM(cfg), std=0.02).eval()
    with torch.device("meta"):
        flex = VLM(cfg, loupe.method_options("flexattn", hr_size=3 * cfg.vision.image_size, first_layer=first,
                                             pool=min(9, cfg.vision.grid), budget=0.1, hr_norm=hr_norm))
    flex.vision_tower, flex.projector, flex.decoder = base.vision_tower, base.projector, base.decoder
    flex.method.to_empty(device="cpu")
    flex.method.init_from_base(flex)
    flex.method.init_buffers()
    g, w = cfg.vision.grid, cfg.text.hidden_size
    gen = torch.Generator().manual_seed(seed)
    lr = torch.randn(1, g * g, w, generator=gen) * scale  # (1, N, W)
    hr = lr.view(1, g, g, w).repeat_interleave(3, 1).repeat_interleave(3, 2).reshape(1, 9 * g * g, w)
    hr = hr + 0.3 * scale * torch.randn(hr.shape, generator=gen)  # (1, M, W)
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, g * g), cfg.image_token_id),
                     torch.randint(5, 400, (1, 24), generator=gen)], 1)
    with torch.no_grad():
        plain = F.log_softmax(base(ids, images=ImageInputs(lr)).logits[:, -1].float(), -1)
        seen = F.log_softmax(flex.eval()(ids, images=ImageInputs(lr, hr=hr)).logits[:, -1].float(), -1)
    return float((plain.exp() * (plain - seen)).sum())


@pytest.mark.parametrize("shapes", ["tiny", "llava-7b-layers"])
def test_normed_hr_keys_leave_a_converted_model_s_answers_nearly_unchanged(shapes: str) -> None:
    """With the gate fully open on a freshly converted model, normed HR features move the answer
    distribution little; the official raw path, at the projector's real scale, moves it a lot."""
    vision = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, patch_size=14)
    if shapes == "tiny":
        cfg = loupe.VLMConfig(vision=loupe.VisionConfig(image_size=56, **vision),
                              text=loupe.TextConfig(vocab_size=512, hidden_size=128, intermediate_size=384,
                                                    num_layers=4, num_heads=4, num_kv_heads=2,
                                                    max_position_embeddings=2048), image_token_id=4)
        first = 2
    else:  # LLaVA-7B's decoder layer (width 4096, 32 heads, FFN 11008), 2 layers, an 8 x 8 LR grid
        cfg = loupe.VLMConfig(vision=loupe.VisionConfig(image_size=112, **vision),
                              text=loupe.TextConfig(vocab_size=512, hidden_size=4096, intermediate_size=11008,
                                                    num_layers=2, num_heads=32, num_kv_heads=32,
                                                    max_position_embeddings=4096), image_token_id=4)
        first = 1
    normed, raw = (answer_kl(cfg, 21.0, first, norm) for norm in ("layer", "none"))
    assert normed < 0.05, f"normed HR keys moved the answers by KL {normed:.4f}"  # measured: 0.006, 0.027
    assert raw > 3 * normed, f"raw {raw:.4f} vs normed {normed:.4f}: the test no longer separates them"


def test_hr_projections_copy_the_base_bias_and_norm() -> None:
    """W'_K, W'_V start as the layer's W_K, W_V with their biases where the base has q/k/v bias
    (Qwen2); the norm on Z as the layer's input norm."""
    from loupe.tiny import init_random_, tiny_config
    from loupe.vlm import VLM
    cfg = tiny_config(layers=3)
    cfg = loupe.VLMConfig(vision=cfg.vision, text=loupe.TextConfig(**{**cfg.text.__dict__, "qkv_bias": True}),
                          image_token_id=cfg.image_token_id)
    model = init_random_(VLM(cfg, loupe.method_options("flexattn", hr_size=168, pool=4, first_layer=1)), std=0.5)
    model.method.init_from_base(model)
    for key, proj in model.method.layers.items():
        layer = model.decoder.layers[int(key)]
        assert proj.k_proj.bias is not None and torch.equal(proj.k_proj.bias, layer.self_attn.k_proj.bias)
        assert torch.equal(proj.v_proj.bias, layer.self_attn.v_proj.bias)
        assert torch.equal(proj.k_proj.weight, layer.self_attn.k_proj.weight)
        assert torch.equal(proj.norm.weight, layer.input_layernorm.weight)


def test_selection_scores_are_float32_in_a_bf16_model() -> None:
    from loupe.nn.attention import row_attention
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 1, 64, generator=gen) * 3).bfloat16()  # (B, H, R, D)
    k = (torch.randn(1, 2, 4096, 64, generator=gen) * 3).bfloat16()  # (B, G, Tk, D)
    mask = torch.ones(1, 1, 4096, dtype=torch.bool)
    _, probs = row_attention(q, k, None, mask)
    assert probs.dtype == torch.float32
    kk = k.float().repeat_interleave(2, 1)
    exact = torch.softmax(q.float() @ kk.transpose(-1, -2) / 8, -1)
    in_bf16 = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)).float() / 8, -1)
    torch.testing.assert_close(probs, exact, rtol=1e-5, atol=1e-7)
    assert (in_bf16 - exact).abs().max() > 10 * (probs - exact).abs().max()  # bf16 scores would decide by rounding


@torch.no_grad()
def test_the_padding_margin_is_zeroed_in_training_and_evaluation(base_path: Path, tmp_path: Path) -> None:
    """Image sizes travel through the image sources `loupe.train` and `loupe.evaluate` read: a wide image's
    square-padding rows are never selected (threshold 0 selects every other cell)."""
    from PIL import Image

    from loupe.train import FeatureImages, PixelImages
    model = flex(base_path, threshold=0.0)
    path = tmp_path / "wide.png"
    noise = torch.rand(60, 120, 3, generator=torch.Generator().manual_seed(0))  # (H, W, 3): twice as wide as high
    Image.fromarray((noise * 255).byte().numpy()).save(path)
    ids = prompt_ids(10, 16, seed=3)

    def hr_rows_selected(**inputs) -> torch.Tensor:
        sel = model(ids, **inputs).report.selection[3][0, 0].view(12, 12)  # (G, G) of the last row
        return sel.any(1)  # per HR row of the grid

    for source in (FeatureImages(model, [path], progress=False), PixelImages([path], HR, progress=False)):
        pics = source.model_inputs([0])
        rows = hr_rows_selected(pixel_values=pics.pixel_values, image_sizes=pics.image_sizes, images=pics.images)
        assert not rows[:3].any() and not rows[-3:].any() and rows[3:-3].any()  # k = 1 LR row = 3 HR rows each side
    pics = PixelImages([path], HR, progress=False).model_inputs([0])
    assert hr_rows_selected(pixel_values=pics.pixel_values)[:3].any()  # without the sizes the margin is selectable
