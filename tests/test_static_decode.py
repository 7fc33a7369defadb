"""The decode step at static shapes (gpt-fast's recipe) against each method's own eager step:
the same tokens and the same logits step by step, on a left-padded batch of different images;
`torch.compile` of it against it; the methods whose step cannot be static refused with one
warning and decoded eagerly."""

from __future__ import annotations

import warnings

import pytest
import torch

import loupe
from loupe.decode import CAPACITY_STEP, cache_capacity, stepper
from loupe.errors import LoupeError
from loupe.generation import SamplingConfig, generate
from loupe.methods import method_options
from loupe.methods.visor import VisorRun
from loupe.tiny import init_random_, tiny_config

CFG = tiny_config(layers=4)  # GQA 4/2 heads, 16 LR tokens per image
HR = 112
METHODS = {  # every method whose decode step is static, at options that make its extra parts matter
    "lowres": {},
    "hd": dict(hr_size=HR),
    "xattn": dict(hr_size=HR),
    "visor [min]": dict(hr_size=HR, ca_layers=[0, 2], sa_layers=[1, 3], configuration="min"),
    "visor [router]": dict(hr_size=HR, ca_layers=[0, 2], sa_layers=[1, 3], configuration="router"),
    "visor [max]": dict(hr_size=HR, ca_layers=[0, 2], sa_layers=[1, 3], configuration="max"),
    "visor [per sample]": dict(hr_size=HR, ca_layers=[0, 2], sa_layers=[1, 3]),
    "visionzip": dict(dominant=6, contextual=2),
}

# VISOR with each sample's own SA layers: its joint layers hide the visual keys from one sample only
RUNS = {"visor [per sample]": VisorRun(configurations=[[1], [1, 3]])}


def model_for(label: str, seed: int = 0) -> loupe.VLM:
    torch.manual_seed(seed)
    model = loupe.VLM(CFG, method_options(label.split()[0], **METHODS[label]))
    init_random_(model, std=0.15)
    with torch.no_grad():  # open every gate a converted model starts closed, so the added layers count
        for name, p in model.method.named_parameters():
            p.copy_(torch.full_like(p, 0.7) if name.endswith("gate") else p)
    return model.eval()


def batch(model: loupe.VLM, lengths: tuple[int, ...] = (5, 9), seed: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, T) with an image block after two text tokens; ids, mask, pixels."""
    g = torch.Generator().manual_seed(seed)
    n = model.method.tokens_per_image()
    t = max(lengths) + n
    ids, mask = torch.zeros(len(lengths), t, dtype=torch.long), torch.zeros(len(lengths), t, dtype=torch.long)
    for row, length in enumerate(lengths):
        text = torch.randint(5, 200, (length,), generator=g)
        seq = torch.cat([text[:2], torch.full((n,), CFG.image_token_id), text[2:]])
        ids[row, t - len(seq):], mask[row, t - len(seq):] = seq, 1
    size = model.method.image_size()
    return ids, mask, torch.randn(len(lengths), 3, size, size, generator=g)


@torch.inference_mode()
def step_logits(model: loupe.VLM, label: str, mode: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (S, B, V) of decode steps fed `tokens` (B, S) after one prefill."""
    ids, mask, px = batch(model)
    cache = model.new_cache(ids.shape[0], cache_capacity(ids.shape[1] + tokens.shape[1] + 1, mode))
    model(ids, px, mask, cache=cache, last_only=True, run=RUNS.get(label))
    step = stepper(model, cache, RUNS.get(label), mode)
    return torch.stack([step(tokens[:, s].clone()).clone() for s in range(tokens.shape[1])])  # inference tensors in


@pytest.mark.parametrize("label", list(METHODS))
def test_static_step_equals_the_eager_step(label: str) -> None:
    model = model_for(label)
    assert model.method.static_decode() is None
    tokens = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    eager, static = step_logits(model, label, "eager", tokens), step_logits(model, label, "static", tokens)
    assert eager[eager.isfinite()].std() > 0.1  # the logits are informative, not a constant both paths could agree on
    torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-5)
    ids, mask, px = batch(model)
    cfg = SamplingConfig(max_new_tokens=8)
    run = RUNS.get(label)
    assert generate(model, ids, px, mask, cfg, run=run, decode="static").tolist() == \
        generate(model, ids, px, mask, cfg, run=run).tolist()


def test_static_batch_equals_per_sample() -> None:
    """Rows of a left-padded static batch, each with its own SA layers, decode as each prompt
    alone (at its own capacity too)."""
    model = model_for("visor [per sample]")
    ids, mask, px = batch(model)
    cfg, configurations = SamplingConfig(max_new_tokens=8), RUNS["visor [per sample]"].configurations
    both = generate(model, ids, px, mask, cfg, run=RUNS["visor [per sample]"], decode="static")
    for row in range(2):
        real = mask[row].bool()
        alone = generate(model, ids[row : row + 1, real], px[row : row + 1], sampling=cfg, decode="static",
                         run=VisorRun(configurations=configurations[row : row + 1]))
        assert alone[0].tolist() == both[row].tolist()


@pytest.mark.parametrize("label", ["lowres", "visor [per sample]"])
def test_compiled_step_equals_the_static_step(label: str) -> None:
    """The step `torch.compile` captures whole (fullgraph: no break, so no host sync) computes
    what the static step does, and one graph serves every step of the request."""
    torch._dynamo.reset()
    before = graphs()
    model = model_for(label)
    tokens = torch.randint(5, 200, (2, 5), generator=torch.Generator().manual_seed(4))
    static = step_logits(model, label, "static", tokens)
    compiled = step_logits(model, label, "compiled", tokens)
    torch.testing.assert_close(compiled, static, rtol=1e-4, atol=1e-5)
    ids, mask, px = batch(model)
    cfg = SamplingConfig(max_new_tokens=6)
    run = RUNS.get(label)
    assert generate(model, ids, px, mask, cfg, run=run, decode="compiled").tolist() == \
        generate(model, ids, px, mask, cfg, run=run).tolist()
    assert graphs() - before == 1  # 11 steps of 2 requests: one graph


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_a_step_that_cannot_be_static_decodes_eagerly_with_one_warning() -> None:
    torch.manual_seed(0)
    model = loupe.VLM(CFG, method_options("flexattn", hr_size=HR)).eval()
    init_random_(model, std=0.15)
    reason = model.method.static_decode()
    assert reason is not None and "data" in reason
    fastv = loupe.VLM(CFG, method_options("fastv", k=1, ratio=0.5))
    assert "no static form" in fastv.method.static_decode()
    ids, mask, px = batch(model)
    cfg = SamplingConfig(max_new_tokens=4)
    eager = generate(model, ids, px, mask, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: each warning once per place
        first = generate(model, ids, px, mask, cfg, decode="compiled")
        generate(model, ids, px, mask, cfg, decode="compiled")
    said = [str(w.message) for w in caught if "decoding eagerly" in str(w.message)]
    assert len(said) == 1 and "flexattn" in said[0], said
    assert first.tolist() == eager.tolist()


def test_bad_decode_mode_and_a_full_cache_are_refused() -> None:
    model = model_for("lowres")
    ids, mask, px = batch(model)
    with pytest.raises(LoupeError, match="decode='fast'"):
        generate(model, ids, px, mask, SamplingConfig(max_new_tokens=2), decode="fast")  # type: ignore[arg-type]
    cache = model.new_cache(2, ids.shape[1])
    with torch.inference_mode():
        model(ids, px, mask, cache=cache)
    with pytest.raises(LoupeError, match="cache is full"):
        stepper(model, cache, None, "static")
    assert cache_capacity(1, "static") == CAPACITY_STEP and cache_capacity(CAPACITY_STEP + 1, "eager") == \
        CAPACITY_STEP + 1
