"""Dense pretraining of the synth ViT (`loupe.dense`): patch labels, and that it teaches them."""

from __future__ import annotations

import torch

from loupe.data.synthetic import PATTERNS, Obj, Scene, SynthConfig
from loupe.dense import CLASSES, IGNORE, DenseConfig, dense_accuracy, dense_scenes, patch_labels, pretrain_dense
from loupe.tiny import init_random_, synth_tiny_config, token_specific_share
from loupe.vlm import VLM


def _one_square() -> Scene:
    # a red square over master px 40..120 on both axes, its 16 px tag at 72..88
    return Scene([Obj("square", "red", "checks", 80.0, 80.0, 40.0)], [], (230, 230, 230), 0, 256)


def test_patch_labels_mark_the_object_and_its_tag() -> None:
    scene = _one_square()
    name, pattern = patch_labels(scene, 8)  # (64,) each: 32 master px per patch
    red_square = CLASSES.index("red square")
    covered = torch.zeros(8, 8, dtype=torch.long)
    covered[1:4, 1:4] = red_square  # 75%, 100%, 75% of patches 1, 2, 3 on each axis
    assert torch.equal(name.view(8, 8), covered)
    expected = torch.zeros(64, dtype=torch.long)
    expected[2 * 8 + 2] = 1 + PATTERNS.index("checks")  # the tag fills a quarter of patch (2, 2)
    assert torch.equal(pattern, expected)
    # a 64 px window at (64, 64): 8 master px per patch, the tag at 8..24 -> patches 1 and 2
    name, pattern = patch_labels(scene, 8, (64, 64, 64))
    assert (name.view(8, 8)[:7, :7] == red_square).all() and (name.view(8, 8)[7] == 0).all()
    tag = torch.zeros(8, 8, dtype=torch.long)
    tag[1:3, 1:3] = 1 + PATTERNS.index("checks")
    assert torch.equal(pattern.view(8, 8), tag)


def test_dense_scenes_pair_each_scene_with_its_crops_and_leave_native_patterns_unasked() -> None:
    pixels, labels = dense_scenes(3, 0, SynthConfig(), 8, crops=2, progress=False)
    assert pixels.shape == (9, 3, 64, 64) and labels.shape == (9, 2, 64)
    scenes, crops = labels[0::3], torch.cat([labels[1::3], labels[2::3]])
    assert (scenes[:, 1] == IGNORE).all()  # at 64 px every tag is the same grey blob
    assert (crops[:, 1] >= 1).any(dim=1).all()  # every crop holds the tag it was cut around
    assert (scenes[:, 0] >= 2).any(dim=1).all()
    again, _ = dense_scenes(3, 0, SynthConfig(), 8, crops=2, progress=False)
    assert torch.equal(pixels, again)


def test_dense_pretraining_teaches_the_tokens_their_labels() -> None:
    torch.manual_seed(0)
    model = init_random_(VLM(synth_tiny_config(64)), std=0.1)
    assert isinstance(model, VLM)
    pixels, labels = dense_scenes(160, 1, SynthConfig(), 8, crops=1, progress=False)
    fit, held = slice(0, 256), slice(256, 320)
    with torch.no_grad():
        shared_before = token_specific_share(model.image_features(pixels[held]))
    losses, head = pretrain_dense(model, pixels[fit], labels[fit], DenseConfig(steps=200, batch_size=16),
                                  progress=False)
    blind = dense_accuracy(model, torch.nn.Linear(head.in_features, head.out_features), pixels[held], labels[held])
    after = dense_accuracy(model, head, pixels[held], labels[held])
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    names = labels[held, 0][labels[held, 0] >= 2]
    majority = 100.0 * torch.bincount(names).max().item() / len(names)  # the best a blind read-out gets
    assert after["name"] > max(2 * majority, blind["name"] + 10), (after, blind, majority)  # untrained head: blind
    with torch.no_grad():  # the tokens of an image no longer all look alike
        assert token_specific_share(model.image_features(pixels[held])) > 3 * shared_before
