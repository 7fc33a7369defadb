"""FlexAttention's HR selection on hand-made attention maps."""

from __future__ import annotations

import pytest
import torch

from loupe.methods import selection as S

G, POOL, HR = 24, 9, 72


def one_hot_map(cells: list[tuple[int, int]], value: float = 1.0) -> torch.Tensor:
    a = torch.zeros(1, G, G)
    for r, c in cells:
        a[0, r, c] = value
    return a


def allowed() -> torch.Tensor:
    return torch.ones(1, G, G, dtype=torch.bool)


def hr_mask(attn: torch.Tensor, **kw) -> torch.Tensor:
    opts = dict(hr_grid=HR, pool=POOL, threshold=48.0, strategy="attnmap", budget=None, ablation_ratio=0.1)
    opts.update(kw)
    return S.select(attn, allowed() if "allowed" not in kw else kw.pop("allowed"), **opts).view(-1, HR, HR)


def test_one_hot_cell_selects_its_8x8_block() -> None:
    m = hr_mask(one_hot_map([(0, 0)]))
    assert m.sum() == 64 and m[0, :8, :8].all()  # LR cell (0,0) -> pooled cell (0,0) -> HR block 8x8


def test_threshold_is_on_the_0_255_scale() -> None:
    a = one_hot_map([(0, 0)])
    a[0, 23, 23] = 0.18  # 0.18 * 255 = 45.9 < 48: dropped
    a[0, 12, 12] = 0.20  # 51 > 48: kept
    m = hr_mask(a)
    assert m[0, :8, :8].all() and m[0, 32:40, 32:40].all() and not m[0, 64:, 64:].any()
    assert hr_mask(a, threshold=40.0)[0, 64:, 64:].all()


def test_max_pool_merges_neighbouring_cells() -> None:
    # Adaptive 24 -> 9 bins are [0,3), [2,6), ...: cells (0,0) and (1,1) share pooled cell (0,0);
    # column 2 lies in two overlapping bins, so cell (1,2) lights pooled cells (0,0) and (0,1).
    assert hr_mask(one_hot_map([(0, 0), (1, 1)])).sum() == 64
    two = hr_mask(one_hot_map([(1, 2)]))
    assert two.sum() == 128 and two[0, :8, :16].all()


def test_padding_margin_is_never_selected() -> None:
    a = one_hot_map([(0, 5)], 1.0)  # strongest attention sits on the padded top rows
    a[0, 12, 12] = 0.5
    ok = S.margin_allowed(torch.tensor([[100, 300]]), 1, G, a.device)  # wide image: top/bottom padded
    k = int(100 / 300 * G)  # (300 - 100) / 2 / 300 * 24 = 8
    assert not ok[0, :k].any() and not ok[0, G - k:].any() and ok[0, k:G - k].all()
    m = S.select(a, ok, hr_grid=HR, pool=POOL, threshold=48.0, strategy="attnmap", budget=None,
                 ablation_ratio=0.1).view(HR, HR)
    assert not m[:8].any() and m[32:40, 32:40].all()


def test_fixed_budget_keeps_the_top_blocks() -> None:
    a = torch.rand(1, G, G, generator=torch.Generator().manual_seed(0))
    m = hr_mask(a, budget=10 / 81)
    assert m.sum() == 10 * 64
    full = hr_mask(a, budget=1.0)
    assert full.all()


def test_never_empty_and_no_nan_on_constant_maps() -> None:
    for a in (torch.zeros(1, G, G), torch.full((1, G, G), 3.0)):
        m = hr_mask(a)
        assert m.sum() == 64  # one block, not zero, not everything
    m = hr_mask(one_hot_map([(5, 5)], 1e-3), threshold=255.0)
    assert m.sum() == 64 and m[0, 8:16, 8:16].all()  # falls back to the most-attended block


def test_random_and_center_strategies() -> None:
    torch.manual_seed(0)
    rnd = S.select(torch.zeros(400, G, G), torch.ones(400, G, G, dtype=torch.bool), hr_grid=HR, pool=POOL,
                   threshold=48.0, strategy="random", budget=None, ablation_ratio=0.1)
    frac = rnd.float().mean().item()
    assert 0.08 < frac < 0.13 and rnd.any(1).all()
    center = hr_mask(one_hot_map([(0, 0)]), strategy="center").view(HR, HR)
    assert center.sum() == 9 * 64 and center[24:48, 24:48].all()  # central 3x3 blocks, attention ignored


# ---- oracle selection and tag hits (measuring selection directly) ------------------------------
def test_box_cover_and_tag_tokens_on_hand_made_boxes() -> None:
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.75],  # exactly cell (row 2, col 1) of a 4 x 4 grid
                          [0.30, 0.10, 0.35, 0.15]])  # smaller than a cell: the one it covers most
    cover = S.box_cover(boxes, 4)
    assert torch.allclose(cover[0], torch.zeros(4, 4).index_put_((torch.tensor([2]), torch.tensor([1])),
                                                                   torch.tensor([1.0])))
    assert float(cover[1].sum()) == pytest.approx(0.05 * 0.05 * 16)
    tags = S.tag_tokens(boxes, 4).view(2, 4, 4)
    assert tags[0].nonzero().tolist() == [[2, 1]] and tags[1].nonzero().tolist() == [[0, 1]]
    selected = torch.zeros(2, 16, dtype=torch.bool)
    selected[0, 2 * 4 + 1] = True
    assert S.tag_hits(selected, boxes, 4).tolist() == [True, False]


def test_oracle_blocks_take_the_tag_first_then_the_nearest_at_the_budget() -> None:
    box = torch.tensor([[0.30, 0.30, 0.45, 0.45]])  # inside block (1, 1) of a 3 x 3 pool
    one = S.oracle_blocks(box, 3, ratio=0.1)  # ceil(0.9) = 1 block
    assert one[0].nonzero().tolist() == [[1, 1]]
    four = S.oracle_blocks(torch.tensor([[0.30, 0.30, 0.40, 0.40]]), 3, ratio=0.4)  # ceil(3.6) = 4 blocks
    assert four.sum() == 4 and bool(four[0, 1, 1])
    whole = S.oracle_blocks(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 3, ratio=0.1)  # no tag: the central block
    assert whole[0].nonzero().tolist() == [[1, 1]]
    masks = S.select(torch.rand(1, 6, 6), torch.ones(1, 6, 6, dtype=torch.bool), hr_grid=12, pool=3, threshold=48,
                     strategy="oracle", budget=None, ablation_ratio=0.1, boxes=box)
    assert masks.view(12, 12)[4:8, 4:8].all() and masks.sum() == 16  # one block = 4 x 4 HR tokens
