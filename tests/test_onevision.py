"""LLaVA-OneVision: Loupe against transformers' LlavaOnevisionForConditionalGeneration and its
processor, through the production loader, on a tiny random checkpoint saved with
`save_pretrained`.

The tiny model keeps OneVision's geometry at a small tile: SigLIP tiles of 42 px (3 x 3
patches), the 36 pinpoints at that tile (42..252 px per side) and the anyres_max_9 cap, so
a large image takes the downsampling path exactly as a 2304 px image does at 384 px tiles.
Tolerance as in test_parity (fp32 round-off of an equivalent order of operations).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import loupe
from loupe.anyres import AnyResProcessor, layout, token_count
from loupe.checkpoints import from_pretrained, save_pretrained
from loupe.cli import main
from loupe.config import VLMConfig, default_pinpoints
from loupe.errors import ConfigError, LoupeError
from loupe.generation import SamplingConfig, answer, generate
from loupe.methods.base import METHODS, Method, MethodConfig, register
from loupe.methods.selection import spread, upsample
from loupe.nn.rope import Rope
from loupe.packing import AnyResPacking
from loupe.text import Tokenizer, chatml_prompt
from loupe.tiny import tiny_chatml_tokenizer, tiny_onevision_config

transformers = pytest.importorskip("transformers")
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (  # noqa: E402
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)
TILE, VOCAB, IMAGE_TOKEN = 42, 300, 3
# (height, width): square, wide, tall, tiny, and large enough for the anyres_max_9 downsample
SIZES = {"square": (120, 120), "wide": (47, 200), "tall": (230, 61), "tiny": (9, 13), "large": (250, 240)}
# The chat template the published llava-hf OneVision processor carries (the conversion script's).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_onevision_config(**top: object) -> transformers.LlavaOnevisionConfig:
    vision = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, image_size=TILE, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=1024,
                tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    args = dict(image_token_index=IMAGE_TOKEN, image_grid_pinpoints=default_pinpoints(TILE), **top)
    return transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, **args)


def save_hf_onevision(folder: Path, seed: int = 0, **top: object) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(hf_onevision_config(**top)).eval()
    with torch.no_grad():  # lift the projector and the newline out of near-zero so image tokens matter
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
        model.model.image_newline.normal_(0, 1.0)
    model.save_pretrained(folder)
    tiny_chatml_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def hf_ov(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.PreTrainedModel, Path]:
    path = tmp_path_factory.mktemp("ov") / "hf-ov"
    return save_hf_onevision(path), path


def photo(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def prompt_with(n_image: int, seed: int, before: int = 3, after: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, VOCAB, (before + after,), generator=g)
    return torch.cat([text[:before], torch.full((n_image,), IMAGE_TOKEN), text[before:]])[None]


def hf_processor_count(h: int, w: int, cfg: VLMConfig) -> int:
    """transformers' LlavaOnevisionProcessor count of image tokens, on a stand-in for the
    processor (building a real one needs torchvision for its video processor)."""
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                           num_image_tokens=cfg.vision.grid**2, vision_aspect_ratio=cfg.vision_aspect_ratio)
    proc._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, proc)
    return LlavaOnevisionProcessor._get_number_of_features(proc, h, w, TILE, TILE)


# ---- model parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIZES)
def test_logits_match_transformers(hf_ov, name: str) -> None:
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    h, w = SIZES[name]
    images = ours.prepare_images([photo(h, w, seed=h)])
    n = images.tokens[0]
    assert n == hf_processor_count(h, w, ours.cfg)
    lay = layout(ours.cfg, h, w)
    if name == "large":
        assert lay.kept != lay.unpadded  # the anyres_max_9 downsample ran
    ids = prompt_with(n, seed=w)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=images.pixel_values, image_sizes=images.image_sizes).logits
        got = ours(ids, images.pixel_values, image_sizes=images.image_sizes).logits
    assert got.shape == expected.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(got, expected, **TOL)


def test_left_padded_batch_of_two_sizes(hf_ov) -> None:
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    pictures = [photo(*SIZES["wide"], seed=1), photo(*SIZES["large"], seed=2)]
    images = ours.prepare_images(pictures)
    assert images.tokens[0] != images.tokens[1] and images.pixel_values.shape[1] == layout(ours.cfg, 250, 240).patches
    rows = [prompt_with(n, seed=i, after=4 + 3 * i)[0] for i, n in enumerate(images.tokens)]
    t = max(len(r) for r in rows)
    ids = torch.zeros(2, t, dtype=torch.long)
    mask = torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=images.pixel_values, image_sizes=images.image_sizes,
                      attention_mask=mask).logits
        got = ours(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
        alone = [ours(r[None], images.pixel_values[i:i + 1, :layout(ours.cfg, *pictures[i].size[::-1]).patches],
                      image_sizes=images.image_sizes[i:i + 1]).logits[0] for i, r in enumerate(rows)]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], **TOL)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i, t - len(r):], alone[i], **TOL)  # batched = per sample
    assert torch.isfinite(got).all()


def test_greedy_generation_matches_transformers(hf_ov) -> None:
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    images = ours.prepare_images([photo(*SIZES["tall"], seed=5)])
    ids = prompt_with(images.tokens[0], seed=6)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=images.pixel_values, image_sizes=images.image_sizes,
                               max_new_tokens=16, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, images.pixel_values, sampling=SamplingConfig(max_new_tokens=16),
                   image_sizes=images.image_sizes)
    assert expected.shape == (1, 16)
    assert got.tolist() == expected.tolist()


def test_lowres_is_the_overview_alone(hf_ov) -> None:
    """lowres on OneVision: the overview tile's 9 tokens, no newline - checked against
    transformers' own tower, projector and decoder fed those features."""
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "lowres", dtype=torch.float32)
    images = ours.prepare_images([photo(*SIZES["square"], seed=7)])
    assert images.tokens == [ours.cfg.vision.grid**2]
    ids = prompt_with(images.tokens[0], seed=8)
    with torch.no_grad():
        vt = hf.model.vision_tower(images.pixel_values[:, 0], output_hidden_states=True)
        feats = hf.model.multi_modal_projector(vt.hidden_states[-1])  # (1, 9, W)
        embeds = hf.model.get_input_embeddings()(ids.clamp(max=VOCAB - 1))
        embeds[ids == IMAGE_TOKEN] = feats[0]
        expected = hf(inputs_embeds=embeds).logits
        got = ours(ids, images.pixel_values, image_sizes=images.image_sizes).logits
    torch.testing.assert_close(got, expected, **TOL)


def test_siglip_positions_resample_as_transformers(hf_ov) -> None:
    """At another image size SigLIP's learned positions are resampled bicubically, as
    transformers' `interpolate_pos_encoding` does (OneVision itself always runs 384 px tiles)."""
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    px = torch.randn(2, 3, 70, 70, generator=torch.Generator().manual_seed(0))  # 5 x 5 patches, not 3 x 3
    with torch.no_grad():
        expected = hf.model.vision_tower(px, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        got = ours.vision_tower(px, [0, -1])  # (2, 25, 2E): the embeddings and the last layer
    e = ours.cfg.vision.hidden_size
    torch.testing.assert_close(got[..., :e], expected[0], **TOL)
    torch.testing.assert_close(got[..., e:], expected[-1], **TOL)


# ---- preprocessing, counts, text --------------------------------------------------------
def test_processor_matches_transformers() -> None:
    cfg = tiny_onevision_config(tile=TILE)
    pictures = [photo(h, w, seed=h + w) for h, w in [*SIZES.values(), (77, 43), (43, 77), (251, 252)]]
    ref = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                          image_grid_pinpoints=cfg.image_grid_pinpoints,
                                          image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    out = ref(images=pictures, return_tensors="pt")
    pixels, sizes = AnyResProcessor(cfg, cfg.image_mean, cfg.image_std).batch(pictures)
    assert sizes.tolist() == out["image_sizes"].tolist()
    assert pixels.shape == out["pixel_values"].shape
    torch.testing.assert_close(pixels, out["pixel_values"].float(), rtol=0, atol=1e-6)


def test_token_count_equals_processor_and_model() -> None:
    cfg = tiny_onevision_config(tile=TILE)
    model = loupe.VLM(cfg, loupe.methods.parse_method("hd")).eval()
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(5, 700, size=(40, 2))] + [(42, 42), (252, 252), (1, 500)]
    for h, w in sizes:
        assert token_count(cfg, h, w) == hf_processor_count(h, w, cfg), (h, w)
    for h, w in sizes[:6]:
        images = model.prepare_images([Image.new("RGB", (w, h))])
        with torch.no_grad():
            seq = model.method.encode(model, images.pixel_values, images.image_sizes).sequence
        assert seq[0].shape[0] == token_count(cfg, h, w) == images.tokens[0]


def test_reference_size_gives_the_paper_token_count() -> None:
    """At the published settings (384 px tiles, the 36 pinpoints, anyres_max_9) the largest
    image gives 729 + 81 x 82 = 7,371 tokens, VISOR's ~7.3k."""
    cfg = tiny_onevision_config(tile=384)
    assert cfg.vision.grid == 27  # 384 px at 14 px patches: 27 patches, the last 6 px unread (as SigLIP's conv)
    assert token_count(cfg, 2304, 2304) == 729 + 81 * 82  # 6 x 6 tiles, downsampled to 81 x 81
    assert token_count(cfg, 1152, 1152) == 729 + 81 * 82  # 3 x 3 tiles: exactly 81 x 81, no downsample
    assert layout(cfg, 1152, 1152).patches == 10 and layout(cfg, 2304, 2304).patches == 37
    assert token_count(cfg, 384, 384) == 729 + 27 * 28


def test_chat_template_and_expansion_match_transformers(tmp_path: Path) -> None:
    tok_json = tiny_chatml_tokenizer(VOCAB)
    tok_json.save(str(tmp_path / "tokenizer.json"))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok_json, eos_token="<|im_end|>",
                                                  pad_token="<|endoftext|>")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]}]
    expected = hf_tok.apply_chat_template(conversation, chat_template=ONEVISION_TEMPLATE, tokenize=False,
                                          add_generation_prompt=True)
    assert chatml_prompt("What is here?") == expected
    ours = Tokenizer.from_folder(tmp_path, image_token_id=IMAGE_TOKEN)
    text = chatml_prompt("What is here?")
    assert ours.encode(text, [37]) == hf_tok(text.replace("<image>", "<image>" * 37))["input_ids"]
    two = f"<image>\n{text}"
    assert ours.encode(two, [5, 11]).count(IMAGE_TOKEN) == 16
    with pytest.raises(LoupeError, match="holds 2 <image> placeholder"):
        ours.encode(two, [5])


# ---- checkpoints ----------------------------------------------------------------------------
PUBLISHED = [(r"^vision_tower\.", "vision_tower.vision_model.")]


def test_published_and_in_memory_layouts_load_equal(hf_ov, tmp_path: Path) -> None:
    """The published llava-hf layout (`vision_tower.vision_model.*`, `language_model.model.*`,
    `image_newline`, no lm_head) and transformers' in-memory one (`model.*`, `lm_head.weight`)
    give the model save_pretrained's layout gives."""
    _, path = hf_ov
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in state and "language_model.lm_head.weight" not in state  # tied, not stored
    published = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in state.items()}
    memory = {("model.language_model." + k.removeprefix("language_model.model.")
               if k.startswith("language_model.model.") else "model." + k): v for k, v in state.items()}
    memory["lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    ref = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    images = ref.prepare_images([photo(*SIZES["wide"], seed=9)])
    ids = prompt_with(images.tokens[0], seed=10)
    with torch.no_grad():
        expected = ref(ids, images.pixel_values, image_sizes=images.image_sizes).logits
    for name, layout_state in (("published", published), ("memory", memory)):
        folder = tmp_path / name
        folder.mkdir()
        save_file(layout_state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((path / "config.json").read_text())
        model = loupe.from_pretrained(folder, "hd", dtype=torch.float32)
        with torch.no_grad():
            got = model(ids, images.pixel_values, image_sizes=images.image_sizes).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight  # tied at load


def test_save_round_trip_and_transformers_reads_ours(hf_ov, tmp_path: Path) -> None:
    hf, path = hf_ov
    ours = loupe.from_pretrained(path, "hd", dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ours = ours.float()
    save_pretrained(ours, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert again.cfg == ours.cfg and again.method.name == "hd"
    theirs = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    images = ours.prepare_images([photo(*SIZES["tall"], seed=11)])
    ids = prompt_with(images.tokens[0], seed=12)
    with torch.no_grad():
        a = again(ids, images.pixel_values, image_sizes=images.image_sizes).logits
        b = theirs(input_ids=ids, pixel_values=images.pixel_values, image_sizes=images.image_sizes).logits
        c = hf(input_ids=ids, pixel_values=images.pixel_values, image_sizes=images.image_sizes).logits
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(b, c, rtol=1e-2, atol=2e-2)  # the bf16 round trip of the weights, only


def test_preprocessor_config_sets_normalisation(hf_ov, tmp_path: Path) -> None:
    _, path = hf_ov
    folder = tmp_path / "with-pre"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((path / f).read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                 "image_std": [0.4, 0.5, 0.6]}))
    cfg = loupe.from_pretrained(folder, dtype=torch.float32).cfg
    assert cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (0.4, 0.5, 0.6)
    assert loupe.from_pretrained(path, dtype=torch.float32).cfg.image_mean == (0.5, 0.5, 0.5)  # SigLIP's


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(("top", "match"), [
    ({"image_grid_pinpoints": []}, "image_grid_pinpoints=\\[\\]"),
    ({"image_grid_pinpoints": [[42, 42], [42, 50]]}, "image_grid_pinpoints=\\[42, 50\\]"),
    ({"vision_aspect_ratio": "anyres_9"}, "vision_aspect_ratio='anyres_9'"),
    ({"vision_feature_select_strategy": "default"}, "SigLIP has none"),
])
def test_bad_onevision_config_is_named(tmp_path: Path, top: dict[str, object], match: str) -> None:
    d = hf_onevision_config().to_dict()
    d.update(top)
    with pytest.raises(ConfigError, match=match):
        VLMConfig.from_hf(d)


def test_methods_and_inputs_of_the_other_family_are_refused(hf_ov, tmp_path: Path) -> None:
    _, path = hf_ov
    @dataclass(frozen=True)
    class PlainConfig(MethodConfig):
        name: ClassVar[str] = "plain-test-only"

    @register
    class Plain(Method):  # a method with no OneVision form
        name = "plain-test-only"
        config_class = PlainConfig
    try:
        with pytest.raises(ConfigError, match="'plain-test-only' has no LLaVA-OneVision form yet.*choose one of "
                                              "\\['fastv', 'flexattn', 'hd', 'hired', 'lowres', 'pdrop', "
                                              "'sparsevlm', 'visionzip', 'visor', 'xattn'\\]"):
            loupe.from_pretrained(path, "plain-test-only")
    finally:
        del METHODS["plain-test-only"]
    with pytest.raises(ConfigError, match="LLaVA-HD's options \\{'hr_size': 84\\} do not apply"):
        loupe.from_pretrained(path, "hd", hr_size=84)
    ours = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    ids = prompt_with(9, seed=0)
    with pytest.raises(LoupeError, match="takes AnyRes tiles"):
        ours(ids, torch.zeros(1, 3, TILE, TILE), image_sizes=torch.tensor([[42, 42]]))  # a LLaVA-1.5 image
    with pytest.raises(LoupeError, match="needs image_sizes"):
        ours(ids, torch.zeros(1, 2, 3, TILE, TILE))
    with pytest.raises(LoupeError, match="needs 5 tiles .* hold 2"):
        ours(ids, torch.zeros(1, 2, 3, TILE, TILE), image_sizes=torch.tensor([[84, 84]]))
    images = ours.prepare_images([photo(*SIZES["square"], seed=1)])
    with pytest.raises(LoupeError, match=f"input_ids hold 9 image tokens .* give {images.tokens[0]} features"):
        ours(ids, images.pixel_values, image_sizes=images.image_sizes)
    with pytest.raises(LoupeError, match="depends on the image's size"):
        ours.method.tokens_per_image()


def test_image_beyond_the_positions_names_both_numbers(tmp_path: Path) -> None:
    cfg = tiny_onevision_config(tile=TILE)
    cfg.text.max_position_embeddings = 64
    model = loupe.VLM(cfg, loupe.methods.parse_method("hd"))
    with pytest.raises(LoupeError, match=r"250x240 .* takes 99 AnyRes tokens, more than the model's 64 positions"):
        model.prepare_images([photo(250, 240, seed=0)])


# ---- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lowres", "hd", "visor", "xattn", "flexattn", "fastv", "pdrop", "sparsevlm",
                                    "visionzip", "hired"])
def test_loupe_generate_on_onevision(hf_ov, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every method end to end through the CLI: converted from the OneVision folder, then
    `loupe generate` streams the answer the Python API gives."""
    _, path = hf_ov
    # the tiny overview is 3 x 3 patches; the tiny decoder has 2 layers (FastV's default k = 2 needs 3)
    options = {"flexattn": ["-o", "pool=3"], "fastv": ["-o", "k=1"], "sparsevlm": ["-o", "layers=[0]"],
               "visionzip": ["-o", "signal=mean", "-o", "dominant=4", "-o", "contextual=2"],
               "hired": ["-o", "signal=mean"]}.get(method, [])  # pdrop: stage at layer 1
    converted = tmp_path / method
    assert main(["convert", str(path), str(converted), "--method", method, *options]) == 0
    image = tmp_path / "odd.png"
    photo(71, 190, seed=3).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", str(converted), "--image", str(image), "--prompt",
                 "What is in the image?", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model = loupe.from_pretrained(converted)
    tok = Tokenizer.from_folder(converted, IMAGE_TOKEN)
    expected = answer(model, tok, image, "What is in the image?", SamplingConfig(6, stop_tokens=[2]))
    assert printed == expected + "\n"  # the streamed answer, in OneVision's template with AnyRes tiles
    images = model.prepare_images([Image.open(image)])
    ids = torch.tensor([tok.encode(chatml_prompt("What is in the image?"), images.tokens)])
    direct = generate(model, ids, images.pixel_values, sampling=SamplingConfig(6), image_sizes=images.image_sizes)
    assert tok.decode(direct[0].tolist()) == expected  # no BOS for Qwen2, the prompt as the processor builds it
    assert main(["info", "--model", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    at_most = {"visionzip": 37 * 6, "hired": int(37 * 9 * 0.2)}.get(method, 99)  # 37 crops at the largest pinpoint
    assert info["image_tokens_per_image"] == ("9" if method in ("lowres", "xattn", "flexattn")
                                              else f"by image size, at most {at_most}")


def test_flops_reads_a_onevision_folder(hf_ov, capsys: pytest.CaptureFixture[str]) -> None:
    _, path = hf_ov
    assert main(["flops", "--model", str(path), "--method", "hd", "--image-size", "47x200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_tokens"] == token_count(loupe.from_pretrained(path).cfg, 47, 200)
    assert main(["flops", "--model", str(path), "--method", "hd", "--image-size", "47"]) == 2
    assert "image size '47' is not HEIGHTxWIDTH" in capsys.readouterr().err


# ---- VISOR on OneVision (the paper's setting) -------------------------------------------------
def test_visor_with_every_layer_sa_is_onevision(hf_ov) -> None:
    """No CA layer and every layer SA: VISOR's joint layers are OneVision's own forward."""
    _, path = hf_ov
    hd = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    visor = loupe.from_pretrained(path, "visor", dtype=torch.float32, ca_layers=[], sa_layers=[0, 1],
                                  configuration="max")
    images = hd.prepare_images([photo(*SIZES["wide"], seed=13)])
    assert visor.prepare_images([photo(*SIZES["wide"], seed=13)]).tokens == images.tokens
    ids = prompt_with(images.tokens[0], seed=14)
    with torch.no_grad():
        expected = hd(ids, images.pixel_values, image_sizes=images.image_sizes).logits
        got = visor(ids, images.pixel_values, image_sizes=images.image_sizes).logits
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("configuration", [0, 1])
def test_visor_cached_generation_equals_recomputed_and_batched(hf_ov, configuration: int) -> None:
    _, path = hf_ov
    model = loupe.from_pretrained(path, "visor", dtype=torch.float32, configuration=configuration)
    with torch.no_grad():  # open the CA gates so the CA layers matter
        for module in model.method.cross.values():
            module.attn.gate.fill_(1.0)
    pictures = [photo(120, 120, seed=15), photo(120, 120, seed=16)]  # one AnyRes count: a batchable pair
    images = model.prepare_images(pictures)
    rows = [prompt_with(images.tokens[0], seed=17 + i, after=3 + 4 * i)[0] for i in range(2)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    batched = generate(model, ids, images.pixel_values, mask, SamplingConfig(max_new_tokens=5),
                       image_sizes=images.image_sizes)
    for i, r in enumerate(rows):
        one = generate(model, r[None], images.pixel_values[i:i + 1], sampling=SamplingConfig(max_new_tokens=5),
                       image_sizes=images.image_sizes[i:i + 1])
        assert one.tolist()[0] == batched.tolist()[i]
        seq = r[None]
        for tok in one[0]:  # recomputed from scratch at every step: the cache changes nothing
            with torch.no_grad():
                logits = model(seq, images.pixel_values[i:i + 1], image_sizes=images.image_sizes[i:i + 1]).logits
            assert int(logits[0, -1].argmax()) == int(tok)
            seq = torch.cat([seq, tok.view(1, 1)], dim=1)


def test_visor_on_onevision_refuses_what_it_cannot_run(hf_ov) -> None:
    _, path = hf_ov
    with pytest.raises(ConfigError, match="hr_size=84 does not apply"):
        loupe.from_pretrained(path, "visor", hr_size=84)
    model = loupe.from_pretrained(path, "visor", dtype=torch.float32)
    images = model.prepare_images([photo(*SIZES["wide"], seed=1), photo(*SIZES["tall"], seed=2)])
    rows = [prompt_with(n, seed=i)[0] for i, n in enumerate(images.tokens)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with pytest.raises(LoupeError, match="batches images of one AnyRes token count .* batch them by size"):
        model(ids, images.pixel_values, mask, image_sizes=images.image_sizes)


def test_convert_onevision_to_visor_places_the_papers_layers(hf_ov, tmp_path: Path) -> None:
    """`loupe convert` from a OneVision checkpoint; at 24 layers the default placement is the
    paper's: L/3 CA layers spread over depth and L/3 selectable SA layers, one after each."""
    _, path = hf_ov
    assert main(["convert", str(path), str(tmp_path / "visor"), "--method", "visor"]) == 0
    model = loupe.from_pretrained(tmp_path / "visor")
    assert model.method.name == "visor" and isinstance(model.packing, AnyResPacking)
    assert (tmp_path / "visor" / "tokenizer.json").is_file()
    options = loupe.methods.method_options("visor")
    cfg = tiny_onevision_config(layers=24)
    assert options.resolved_ca(cfg) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert options.resolved_sa(cfg) == [1, 4, 7, 10, 13, 16, 19, 22]


# ---- XAttn on OneVision -----------------------------------------------------------------------
def test_xattn_closed_gate_is_lowres_and_batch_of_sizes_is_per_sample(hf_ov) -> None:
    _, path = hf_ov
    lowres = loupe.from_pretrained(path, "lowres", dtype=torch.float32)
    xattn = loupe.from_pretrained(path, "xattn", dtype=torch.float32)
    pictures = [photo(*SIZES["wide"], seed=21), photo(*SIZES["large"], seed=22)]
    images = xattn.prepare_images(pictures)
    assert images.tokens == [9, 9]
    rows = [prompt_with(9, seed=23 + i, after=3 + 5 * i)[0] for i in range(2)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with torch.no_grad():
        closed = xattn(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
        base = lowres(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
        torch.testing.assert_close(closed, base, rtol=0, atol=0)  # a converted model is its base
        for module in xattn.method.cross:
            module.gate.fill_(1.0)
        opened = xattn(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
        assert (opened - base).abs().max() > 1e-3  # the AnyRes grid now reaches every layer
        for i, r in enumerate(rows):  # HR of different lengths, padded and masked: batched = per sample
            n = layout(xattn.cfg, *SIZES["wide" if i == 0 else "large"]).patches
            alone = xattn(r[None], images.pixel_values[i:i + 1, :n], image_sizes=images.image_sizes[i:i + 1]).logits
            torch.testing.assert_close(opened[i, t - len(r):], alone[0], **TOL)
    one = generate(xattn, rows[0][None], images.pixel_values[:1], sampling=SamplingConfig(max_new_tokens=4),
                   image_sizes=images.image_sizes[:1])
    seq = rows[0][None]
    for tok in one[0]:  # cached HR keys/values = recomputed
        with torch.no_grad():
            logits = xattn(seq, images.pixel_values[:1], image_sizes=images.image_sizes[:1]).logits
        assert int(logits[0, -1].argmax()) == int(tok)
        seq = torch.cat([seq, tok.view(1, 1)], dim=1)


# ---- FlexAttention on OneVision (Loupe's) --------------------------------------------------
def flex_model(path: Path, **options: object) -> loupe.VLM:
    model = loupe.from_pretrained(path, "flexattn", dtype=torch.float32, pool=3, **options)
    with torch.no_grad():  # W'_K, W'_V away from the base's copies, so HR keys differ from LR ones
        for proj in model.method.layers.values():
            proj.k_proj.weight.add_(0.05 * torch.randn_like(proj.k_proj.weight))
    return model


def test_flexattn_batch_of_sizes_is_per_sample_and_cached_is_recomputed(hf_ov) -> None:
    _, path = hf_ov
    model = flex_model(path)
    pictures = [photo(*SIZES["wide"], seed=31), photo(*SIZES["large"], seed=32)]
    images = model.prepare_images(pictures)
    assert images.tokens == [9, 9]
    rows = [prompt_with(9, seed=33 + i, after=3 + 5 * i)[0] for i in range(2)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with torch.no_grad():
        out = model(ids, images.pixel_values, mask, image_sizes=images.image_sizes)
        for i, r in enumerate(rows):
            n = layout(model.cfg, *SIZES["wide" if i == 0 else "large"]).patches
            alone = model(r[None], images.pixel_values[i:i + 1, :n], image_sizes=images.image_sizes[i:i + 1])
            torch.testing.assert_close(out.logits[i, t - len(r):], alone.logits[0], **TOL)
            m_i = layout(model.cfg, *SIZES["wide" if i == 0 else "large"]).grid_tokens
            for layer, sel in out.report.selection.items():  # padding HR slots are never selected
                assert not sel[i, :, m_i:].any()
                torch.testing.assert_close(sel[i, :, :m_i], alone.report.selection[layer][0])
    one = generate(model, rows[1][None], images.pixel_values[1:], sampling=SamplingConfig(max_new_tokens=4),
                   image_sizes=images.image_sizes[1:])
    seq = rows[1][None]
    for tok in one[0]:  # memoised HR projections = recomputed from scratch
        with torch.no_grad():
            logits = model(seq, images.pixel_values[1:], image_sizes=images.image_sizes[1:]).logits
        assert int(logits[0, -1].argmax()) == int(tok)
        seq = torch.cat([seq, tok.view(1, 1)], dim=1)


def test_flexattn_selection_spreads_over_each_grid_and_rope_follows_the_overview(hf_ov) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(4, 3, 3, generator=g) < 0.4
    assert torch.equal(spread(blocks, 9, 6), upsample(blocks, (9, 6)))  # multiples: the official nearest
    one_row = torch.zeros(1, 3, 3, dtype=torch.bool)
    one_row[0, 2, 1] = True
    assert spread(one_row, 1, 6).any()  # a grid with fewer rows than blocks loses no selected block
    _, path = hf_ov
    model = flex_model(path)
    h, w = 40, 42  # one tile: a 3 x 3 grid, the overview's own shape
    images = model.prepare_images([photo(h, w, seed=1)])
    assert layout(model.cfg, h, w).kept == (3, 3)
    ids = prompt_with(9, seed=2)
    cache = model.new_cache(1, ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, images.pixel_values, cache=cache, image_sizes=images.image_sizes)
    state = cache.method_state
    # At the overview's own grid the bicubic resample is the identity: the HR keys sit at the
    # overview tokens' positions (the image block starts at column 3 of the prompt).
    assert state.image_cols.tolist() == [list(range(3, 12))]
    expected = Rope.at(state.image_cols, model.cfg.text.head_dim, model.cfg.text.rope_theta, torch.float32)
    torch.testing.assert_close(state.hr_rope.cos, expected.cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.hr_rope.sin, expected.sin, rtol=0, atol=1e-6)
    wide = model.prepare_images([photo(*SIZES["wide"], seed=3)])
    cache = model.new_cache(1, ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, wide.pixel_values, cache=cache, image_sizes=wide.image_sizes)
    rows, cols = layout(model.cfg, *SIZES["wide"]).kept
    cos = cache.method_state.hr_rope.cos.view(rows, cols, -1)  # the wide grid: angles vary along both axes
    assert cos.shape[:2] == (rows, cols) and cos[0, 0].ne(cos[-1, -1]).any()


# ---- token reduction on OneVision -------------------------------------------------------------
PRUNING = {"fastv": ({"k": 1, "ratio": 0.0}, {"k": 1, "ratio": 0.5}),
           "pdrop": ({"layers": [1], "ratio": 1.0}, {"layers": [1], "ratio": 0.5}),
           "sparsevlm": ({"layers": [0], "ratios": [1.0], "recycle": False}, {"layers": [0], "ratios": [0.5],
                                                                               "recycle": False})}


@pytest.mark.parametrize("method", list(PRUNING))
def test_token_reduction_on_onevision_keeps_its_share_of_each_image(hf_ov, method: str) -> None:
    _, path = hf_ov
    hd = loupe.from_pretrained(path, "hd", dtype=torch.float32)
    everything = loupe.from_pretrained(path, method, dtype=torch.float32, **PRUNING[method][0])
    fastv = loupe.from_pretrained(path, method, dtype=torch.float32, **PRUNING[method][1])
    pictures = [photo(*SIZES["wide"], seed=41), photo(*SIZES["large"], seed=42)]
    images = hd.prepare_images(pictures)
    rows = [prompt_with(n, seed=43 + i, after=3 + 4 * i)[0] for i, n in enumerate(images.tokens)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with torch.no_grad():
        kw = dict(image_sizes=images.image_sizes)
        torch.testing.assert_close(everything(ids, images.pixel_values, mask, **kw).logits,
                                   hd(ids, images.pixel_values, mask, **kw).logits, rtol=0, atol=0)
        out = fastv(ids, images.pixel_values, mask, **kw)
        counts = out.report.kept_counts if method == "fastv" else out.report.kept_counts[{"pdrop": 1}.get(method, 0)]
        halves = {"fastv": [n - n // 2 for n in images.tokens], "pdrop": [n // 2 for n in images.tokens],
                  "sparsevlm": [round(n / 2) for n in images.tokens]}[method]
        assert counts.tolist() == halves  # each image its own half
        for i, r in enumerate(rows):
            n = layout(fastv.cfg, *SIZES["wide" if i == 0 else "large"]).patches
            alone = fastv(r[None], images.pixel_values[i:i + 1, :n], image_sizes=images.image_sizes[i:i + 1])
            torch.testing.assert_close(out.logits[i, -1], alone.logits[0, -1], **TOL)


# ---- cost plans against FlopCounterMode -------------------------------------------------------
COST_METHODS = {"lowres": {}, "hd": {}, "visor-max": {"configuration": "max"}, "visor-min": {"configuration": "min"},
                "xattn": {}, "flexattn": {"pool": 3, "memoise": False}, "fastv": {"ratio": 0.5},
                "pdrop": {"layers": [1, 3]}, "visionzip": {"dominant": 3, "contextual": 2, "signal": "mean"},
                "hired": {"rate": 0.3, "signal": "mean"},
                "visor-zip": {"configuration": "max", "visionzip": 0.5, "visionzip_signal": "mean"},
                "sparsevlm": {"layers": [0, 2], "ratios": [0.5, 0.25]}}


@pytest.mark.parametrize("key", list(COST_METHODS))
@pytest.mark.parametrize("size", [SIZES["wide"], SIZES["large"]])
@torch.no_grad()
def test_cost_plan_matches_flop_counter(key: str, size: tuple[int, int]) -> None:
    from loupe.cost import count_flops, estimate, measured_selection
    from loupe.flops import Workload
    torch.manual_seed(0)
    cfg = tiny_onevision_config(tile=TILE, layers=4)
    model = loupe.VLM(cfg, loupe.methods.method_options(key.split("-")[0], **COST_METHODS[key])).eval()
    images = model.prepare_images([photo(*size, seed=0)])
    text = 23
    ids = prompt_with(images.tokens[0], seed=1, before=3, after=text - 3)
    cache = model.new_cache(1, ids.shape[1] + 2)
    out: dict = {}
    prefill = count_flops(lambda: out.update(r=model(ids, images.pixel_values, cache=cache, last_only=True,
                                                     image_sizes=images.image_sizes)))
    tok = out["r"].logits[:, -1].argmax(-1, keepdim=True)
    decode = count_flops(lambda: out.update(d=model(tok, cache=cache, last_only=True)))
    if key == "flexattn":  # the decode step selects anew: cost it at its own fraction
        step = estimate(cfg, model.method.options, Workload(text, new_tokens=2, image_size=size, memoised=False,
                                                            selected=measured_selection(out["d"].report)))
        assert abs(step.decode_per_token - decode) <= 0.01 * decode, (step.decode_per_token, decode)
    frac = measured_selection(out["r"].report) or 0.1
    cost = estimate(cfg, model.method.options, Workload(text, new_tokens=2, image_size=size, selected=frac,
                                                        memoised=key != "flexattn", question_tokens=text - 3))
    assert cost.image_tokens == images.tokens[0]
    checks = [(cost.prefill, prefill)] + ([] if key == "flexattn" else [(cost.decode_per_token, decode)])
    for analytic, counted in checks:
        assert counted > 0 and abs(analytic - counted) <= 0.01 * counted, (analytic, counted)


# ---- vision-side token reduction on OneVision (Loupe's substitute signal) --------------------
def batch_of_two(model: loupe.VLM, sizes: tuple[str, str], seed: int) -> tuple[torch.Tensor, ...]:
    """Two photos of different sizes, prompts left-padded to one length: ids, mask, pixels, sizes, rows."""
    images = model.prepare_images([photo(*SIZES[s], seed=seed + i) for i, s in enumerate(sizes)])
    rows = [prompt_with(n, seed=seed + 10 + i, after=3 + 4 * i)[0] for i, n in enumerate(images.tokens)]
    t = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return ids, mask, images.pixel_values, images.image_sizes, rows


@torch.no_grad()
def test_mean_signal_equals_transformers_eager_siglip_attention(hf_ov) -> None:
    from loupe.methods.reduction import probe_crops
    from loupe.nn.vit import feature_layer_index
    _, path = hf_ov
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    model = loupe.from_pretrained(path, "visionzip", dtype=torch.float32, dominant=3, contextual=2, signal="mean")
    tiles = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(5))
    out = hf.model.vision_tower(tiles, output_hidden_states=True, output_attentions=True)
    layer = feature_layer_index(model.cfg)
    crops = probe_crops(model, tiles, (layer,), "mean")
    torch.testing.assert_close(crops.feats, out.hidden_states[-1], **TOL)
    torch.testing.assert_close(crops.probes[layer].attention, out.attentions[-1].mean(2), **TOL)


def test_visionzip_on_onevision_reduces_every_crop_and_batches(hf_ov) -> None:
    from loupe.methods.onevision import check_tiles, encode_tiles
    _, path = hf_ov
    every = loupe.from_pretrained(path, "visionzip", dtype=torch.float32, dominant=9, contextual=0, signal="mean")
    ids, mask, px, sizes, rows = batch_of_two(every, ("wide", "large"), seed=50)
    with torch.no_grad():  # all 9 patches of every crop dominant: each crop's own tokens, overview first
        tiles = encode_tiles(every, px, check_tiles(every.cfg, px, sizes))
        sequence = every.method.encode(every, px, sizes).sequence
        for t, s in zip(tiles, sequence, strict=True):  # (the probed layer ran eagerly: rounding apart)
            torch.testing.assert_close(s, t.flatten(0, 1), **TOL)
    model = loupe.from_pretrained(path, "visionzip", dtype=torch.float32, dominant=3, contextual=2, signal="mean")
    ids, mask, px, sizes, rows = batch_of_two(model, ("wide", "large"), seed=60)
    assert [len(s) for s in model.method.encode(model, px, sizes).sequence] == [
        layout(model.cfg, *SIZES[s]).patches * 5 for s in ("wide", "large")]
    with torch.no_grad():
        both = model(ids, px, mask, image_sizes=sizes).logits
        for i, r in enumerate(rows):
            n = int(layout(model.cfg, *sizes[i].tolist()).patches)
            alone = model(r[None], px[i:i + 1, :n], image_sizes=sizes[i:i + 1]).logits
            torch.testing.assert_close(both[i, -1], alone[0, -1], **TOL)
    assert "mean-attention signal (Loupe's)" in loupe.methods.method_label(model.method.options, model.cfg)
    with pytest.raises(loupe.ConfigError, match="signal='class' reads the class token's attention.*'siglip'"):
        loupe.from_pretrained(path, "visionzip", dominant=3, contextual=2)


def test_hired_budget_split_adds_up_and_respects_capacity() -> None:
    from loupe.methods.hired import split_budget, tile_weights
    cap = torch.tensor([9, 9, 3, 9])
    shares = split_budget(torch.tensor([5.0, 1.0, 10.0, 0.0]), 17, cap)
    assert int(shares.sum()) == 17 and bool((shares <= cap).all()) and int(shares[2]) == 3  # full: excess passed on
    assert shares.tolist() == [9, 5, 3, 0]
    assert split_budget(torch.zeros(3), 5, torch.tensor([9, 9, 9])).tolist() == [2, 2, 1]  # no signal: even
    assert split_budget(torch.tensor([1.0, 1.0]), 30, torch.tensor([9, 9])).tolist() == [9, 9]  # capped at what is held
    from loupe.anyres import Layout
    tall = Layout(tiles_rows=2, tiles_cols=1, unpadded=(6, 3), kept=(6, 3), overview=9)  # upper and lower tile
    top = torch.zeros(3, 3, dtype=torch.bool)
    top[0] = True  # the overview's top row: all in the upper tile
    assert tile_weights(top, tall, "spatial").tolist() == [6.0, 0.0]  # (each cell counted R * C times)
    top[:] = False
    top[1] = True  # the middle row straddles both tiles: half each
    assert tile_weights(top, tall, "spatial").tolist() == [3.0, 3.0]
    with pytest.raises(loupe.LoupeError, match="partition='raster' splits the overview's 9 tokens into 2"):
        tile_weights(top, tall, "raster")


@torch.no_grad()
def test_hired_on_onevision_keeps_its_budget_per_image_in_grid_order(hf_ov) -> None:
    from loupe.anyres import stitch_tiles
    from loupe.methods.onevision import check_tiles, encode_tiles
    _, path = hf_ov
    every = loupe.from_pretrained(path, "hired", dtype=torch.float32, rate=1.0, signal="mean")
    ids, mask, px, sizes, rows = batch_of_two(every, ("wide", "large"), seed=70)
    tiles = encode_tiles(every, px, check_tiles(every.cfg, px, sizes))
    for feats, seq, (h, w) in zip(tiles, every.method.encode(every, px, sizes).sequence, sizes.tolist(), strict=True):
        lay = layout(every.cfg, h, w)  # rate 1: the overview, then every unpadded grid token (no downsample)
        grid = stitch_tiles(feats[1:], lay, every.cfg.vision.grid)  # (W, R*g, C*g)
        (r, c), (full_h, full_w) = lay.unpadded, grid.shape[1:]
        top, left = (full_h - r) // 2, (full_w - c) // 2
        expected = torch.cat([feats[0], grid[:, top:top + r, left:left + c].flatten(1).T])
        torch.testing.assert_close(seq, expected, **TOL)  # (the probed layers ran eagerly: rounding apart)
    model = loupe.from_pretrained(path, "hired", dtype=torch.float32, rate=0.3, signal="mean")
    ids, mask, px, sizes, rows = batch_of_two(model, ("wide", "large"), seed=80)
    sequence = model.method.encode(model, px, sizes).sequence
    for s, (h, w) in zip(sequence, sizes.tolist(), strict=True):
        lay = layout(model.cfg, h, w)
        assert len(s) == model.method.tokens_for(h, w) == int(lay.patches * 9 * 0.3)
    both = model(ids, px, mask, image_sizes=sizes).logits
    for i, r in enumerate(rows):
        n = layout(model.cfg, *sizes[i].tolist()).patches
        alone = model(r[None], px[i:i + 1, :n], image_sizes=sizes[i:i + 1]).logits
        torch.testing.assert_close(both[i, -1], alone[0, -1], **TOL)
    assert "alpha 0.5, mean-attention signal (Loupe's)" in loupe.methods.method_label(model.method.options, model.cfg)
    with pytest.raises(loupe.ConfigError, match="hired signal='class'"):
        loupe.from_pretrained(path, "hired")


def test_visor_with_a_visionzip_front_end_on_onevision(hf_ov) -> None:
    """VISOR + token reduction on OneVision: the visual stream is `visionzip`'s sequence; with
    every layer SA and no CA layer the model is `visionzip` itself."""
    _, path = hf_ov
    zipped = loupe.from_pretrained(path, "visionzip", dtype=torch.float32, ratio=5 / 9, signal="mean")
    layers = zipped.cfg.text.num_layers
    visor = loupe.from_pretrained(path, "visor", dtype=torch.float32, visionzip=5 / 9, visionzip_signal="mean",
                                  ca_layers=[], sa_layers=list(range(layers)), configurations=[list(range(layers))])
    images = visor.prepare_images([photo(*SIZES["wide"], seed=90)])
    assert images.tokens == [layout(visor.cfg, *SIZES["wide"]).patches * 5]
    ids = prompt_with(images.tokens[0], seed=91)
    with torch.no_grad():
        expected = zipped(ids, images.pixel_values, image_sizes=images.image_sizes).logits
        got = visor(ids, images.pixel_values, image_sizes=images.image_sizes).logits
    torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(ConfigError, match="visor's visionzip front end: visionzip signal='class'"):
        loupe.from_pretrained(path, "visor", visionzip=0.5)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm", "visionzip", "hired"])
def test_token_reduction_on_onevision_takes_no_hr_size(hf_ov, method: str) -> None:
    _, path = hf_ov
    with pytest.raises(ConfigError, match=f"{method} on a OneVision model takes its AnyRes tiles.*hr_size=84"):
        loupe.from_pretrained(path, method, hr_size=84, signal="mean") if method in ("visionzip", "hired") else \
            loupe.from_pretrained(path, method, hr_size=84)
