"""FlexAttention's cheap paths against the plain ones: HR tiles encoded on first use against
every tile encoded at prefill, the compact memo against re-projecting, and a decode step's
host reads (one per HR layer: how many tokens it projects anew)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids

import loupe
from loupe.bench import HostReads
from loupe.cost import estimate, measured_tiles
from loupe.flops import Workload
from loupe.generation import SamplingConfig, generate
from loupe.methods.flexattn import FlexState
from loupe.methods.highres import TileFeatures, encode_tiled

HR = 168  # 3 x 56 -> 3 x 3 tiles of 4 x 4 tokens, 12 x 12 = 144 HR tokens per image
FLEX = dict(pool=4, first_layer=2)  # 4 x 4 blocks of 3 x 3 HR tokens: blocks straddle tiles


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import save_hf_llava
    path = tmp_path_factory.mktemp("m") / "base"
    save_hf_llava(path, text_num_hidden_layers=4, text_num_key_value_heads=2)
    return path


def pair(base_path: Path, **opts) -> tuple[loupe.VLM, loupe.VLM]:
    """Two FlexAttention models with the same options and the same (perturbed) weights."""
    a, b = (loupe.from_pretrained(base_path, "flexattn", dtype=torch.float32, **{**FLEX, **opts}) for _ in "ab")
    with torch.no_grad():  # W'_K, W'_V unlike W_K, W_V, so that HR keys matter on their own
        for p in a.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b.load_state_dict(a.state_dict())
    return a, b


def test_tile_features_read_the_stitched_grid_and_encode_only_what_is_read(base_path: Path) -> None:
    model = loupe.from_pretrained(base_path, "flexattn", dtype=torch.float32, **FLEX)
    px = pixels(2, seed=1, size=HR)
    with torch.no_grad():
        every = encode_tiled(model, px)  # (2, 144, W)
        lazy = TileFeatures(model, px)
        idx = torch.tensor([[0, 13], [143, 142]])  # image 0: tile 0 twice; image 1: its last tile
        torch.testing.assert_close(lazy.gather(idx), every.gather(1, idx[..., None].expand(-1, -1, every.shape[-1])))
        assert lazy.encoded == 2 and lazy.done.sum(1).tolist() == [1, 1]
        lazy.gather(idx)  # read again: nothing encoded again
        assert lazy.encoded == 2
        torch.testing.assert_close(lazy.dense(), every)
        assert lazy.encoded == 18


def test_lazy_hr_generates_what_encoding_every_tile_does(base_path: Path) -> None:
    lazy, every = pair(base_path, lazy_hr=True)
    every.method.options = dataclasses.replace(every.method.options, lazy_hr=False)
    ids, px = prompt_ids(6, 16, seed=2), pixels(2, seed=2, size=HR)
    ids = ids.expand(2, -1)
    cfg = SamplingConfig(max_new_tokens=8)
    assert generate(lazy, ids, px, sampling=cfg).tolist() == generate(every, ids, px, sampling=cfg).tolist()
    with torch.no_grad():
        a, b = lazy(ids, px), every(ids, px)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert a.report.tiles_encoded is not None and 0 < a.report.tiles_encoded <= 1
    assert b.report.tiles_encoded is None


def test_a_central_selection_encodes_the_four_tiles_it_touches(base_path: Path) -> None:
    # center, ratio 0.1 on a 4 x 4 pool: block (2, 2) = HR rows/cols 6..8, which straddle
    # tile rows/cols 1 and 2: 4 of the 9 tiles, whatever the attention.
    model, _ = pair(base_path, strategy="center", lazy_hr=True)
    ids, px = prompt_ids(6, 16, seed=3), pixels(1, seed=3, size=HR)
    with torch.no_grad():
        out = model(ids, px)
    assert out.report.tiles_encoded == pytest.approx(4 / 9)
    # the cost model counts what ran: 4 of 9 tile passes
    cfg, opts = model.cfg, model.method.options
    full, lazy = (estimate(cfg, opts, Workload(hr_tiles=t)).parts["vision.hr"]
                  for t in (1.0, measured_tiles(out.report)))
    assert lazy == pytest.approx(full * 4 / 9)


def test_compact_memo_holds_what_was_projected_and_matches_reprojecting(base_path: Path) -> None:
    memo, again = pair(base_path, strategy="center")
    again.method.options = dataclasses.replace(again.method.options, memoise=False)
    ids, px = prompt_ids(6, 16, seed=4), pixels(1, seed=4, size=HR)
    with torch.no_grad():
        caches = [m.new_cache(1, ids.shape[1] + 4) for m in (memo, again)]
        outs = [m(ids, px, cache=c).logits[:, -1] for m, c in zip((memo, again), caches, strict=True)]
        for tok in (7, 8, 9):
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
            outs = [m(torch.tensor([[tok]]), cache=c).logits[:, -1] for m, c in zip((memo, again), caches, strict=True)]
    state = caches[0].method_state
    assert isinstance(state, FlexState)
    for i, m in state.memo.items():  # the central block's 9 tokens, projected once; slots, not the grid
        k, v, token, filled = m.slots()
        assert m.used == 9 and filled.all() and m.k.shape[2] < 144
        z = state.hr_features(token)
        proj = memo.method.layers[str(i)]
        want_k, want_v = proj(z)
        g, d = memo.cfg.text.num_kv_heads, memo.cfg.text.head_dim
        want_k = state.hr_rope.select(token).apply(want_k.view(1, 9, g, d).transpose(1, 2))
        torch.testing.assert_close(k, want_k)
        torch.testing.assert_close(v, want_v.view(1, 9, g, d).transpose(1, 2))
    assert state.projected == 9 * len(state.memo)


def test_a_decode_step_reads_the_host_once_per_hr_layer(base_path: Path) -> None:
    flex, _ = pair(base_path, strategy="center")  # the selection repeats: nothing new to project or encode
    low = loupe.from_pretrained(base_path, "lowres", dtype=torch.float32)
    reads = {}
    for name, model, px in (("flex", flex, pixels(1, seed=5, size=HR)), ("low", low, pixels(1, seed=5))):
        ids = prompt_ids(6, model.method.tokens_per_image(), seed=5)
        with torch.no_grad():
            cache = model.new_cache(1, ids.shape[1] + 3)
            model(ids, px, cache=cache)
            model(torch.tensor([[7]]), cache=cache)
            with HostReads() as r:
                model(torch.tensor([[8]]), cache=cache)
        reads[name] = r.names
    hr_layers = flex.cfg.text.num_layers - flex.method.first
    # In the layer loop one per HR layer (how many tokens to project anew: here none); around
    # it the gate, and the report's projected fraction.
    extra = list(reads["flex"])
    for name in reads["low"]:
        extra.remove(name)
    assert len(extra) == hr_layers + 2, reads
