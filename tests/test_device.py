"""The device suite: `LOUPE_TEST_DEVICE=cuda pytest tests/test_device.py` (or `=cpu`, which
checks the suite itself). Skipped when the variable is unset, so CPU-only CI skips nothing
it ran before.

On the device, against transformers and against Loupe on the CPU:
- parity with transformers (LLaVA) in fp32 (tolerance 1e-4, TF32 off) and in bf16, where
  elementwise tolerances mean little: Loupe's relative error against transformers' fp32
  logits must be at most 1.5x transformers' own bf16 error (on the CPU: 2.6% against 2.5%);
- the fused SDPA path against the eager reference on the device (masked, grouped-query:
  the path `expand_kv_for_sdpa` reroutes on CUDA);
- greedy generation, batched and left-padded, equal to the CPU's tokens (fp32);
- every method's prefill on a tiny LLaVA and a tiny OneVision: finite, and equal to the
  CPU's logits in fp32;
- `loupe eval` on the device giving the CPU's predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.tiny import write_tiny_checkpoint

DEVICE = os.environ.get("LOUPE_TEST_DEVICE")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="set LOUPE_TEST_DEVICE=cuda (or cpu) to run the device suite")
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def no_tf32() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_with_transformers_on_the_device(tmp_path: Path, dtype: torch.dtype) -> None:
    hf = save_hf_llava(tmp_path / "hf", text_num_key_value_heads=2)
    ours = loupe.from_pretrained(tmp_path / "hf", dtype=dtype, device=DEVICE)
    ids, px = prompt_ids(12, ours.method.tokens_per_image(), seed=1), pixels(1, seed=2)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px).logits  # fp32, CPU
        got = ours(ids, px).logits.float().cpu()  # CPU inputs: forward moves them
        assert ours.device.type == torch.device(DEVICE).type
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, **FP32)
            return
        theirs = hf.to(DEVICE, dtype)(input_ids=ids.to(DEVICE), pixel_values=px.to(DEVICE, dtype)).logits.float().cpu()
    error = lambda x: float((x - expected).norm() / expected.norm())  # noqa: E731
    assert error(got) <= 1.5 * error(theirs) and error(got) < 0.05, (error(got), error(theirs))


def test_fused_attention_equals_eager_on_the_device() -> None:
    from loupe.nn.attention import attend, eager_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g).to(DEVICE) for h in (8, 2, 2))
    mask = (torch.rand(2, 1, 9, 9, generator=g) > 0.3).to(DEVICE)
    mask[..., 0] = True
    fused, _ = attend(q, k, v, mask)
    reference, _ = eager_attention(q, k, v, mask)
    torch.testing.assert_close(fused, reference, **FP32)


def test_batched_generation_on_the_device_gives_the_cpu_tokens(tmp_path: Path) -> None:
    save_hf_llava(tmp_path / "hf")
    cpu = loupe.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    dev = loupe.from_pretrained(tmp_path / "hf", dtype=torch.float32, device=DEVICE)
    n = cpu.method.tokens_per_image()
    short, long = prompt_ids(5, n, seed=3, image_at=1), prompt_ids(9, n, seed=4)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=5)
    sampling = loupe.SamplingConfig(max_new_tokens=6)
    want = loupe.generate(cpu, ids, px, mask, sampling)
    got = loupe.generate(dev, ids, px, mask, sampling)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("onevision", [False, True], ids=["llava", "onevision"])
@pytest.mark.parametrize("method, options", [("lowres", {}), ("hd", {"hr_size": 112}), ("xattn", {"hr_size": 112}),
                                             ("flexattn", {"hr_size": 112}), ("visor", {"hr_size": 112}),
                                             ("fastv", {"k": 1})])
def test_every_method_runs_on_the_device_as_on_the_cpu(tmp_path: Path, onevision: bool, method: str,
                                                       options: dict) -> None:
    folder = write_tiny_checkpoint(tmp_path / "m", onevision=onevision)
    if onevision:
        options = {k: v for k, v in options.items() if k != "hr_size"}  # OneVision's methods take its AnyRes grid
    try:
        cpu = loupe.from_pretrained(folder, method, dtype=torch.float32, **options)
    except loupe.LoupeError as e:
        pytest.skip(f"{method} on this family: {e}")
    dev = loupe.from_pretrained(folder, method, dtype=torch.float32, device=DEVICE, **options)
    dev.load_state_dict(cpu.state_dict())  # the method's new weights are random: use the CPU's
    from PIL import Image

    images = cpu.prepare_images([Image.new("RGB", (60, 45), (200, 30, 90))])
    tok = loupe.Tokenizer.from_folder(folder, cpu.cfg.image_token_id)
    ids, mask = tok.pad_left([loupe.template_for(cpu.cfg).prompt_ids("What is it?", tok, images.tokens)])
    with torch.no_grad():
        want = cpu(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
        got = dev(ids, images.pixel_values, mask, image_sizes=images.image_sizes).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), want, **FP32)


def test_loupe_eval_on_the_device_gives_the_cpu_predictions(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    import io

    from PIL import Image

    from loupe.cli import main

    def png(k: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (60, 45), (40 * k, 90, 200)).save(buf, "PNG")
        return buf.getvalue()

    folder = write_tiny_checkpoint(tmp_path / "m")
    (tmp_path / "tv").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"question_id": k, "question": "what is written?", "image": {"bytes": png(k), "path": None},
         "answers": ["stop"] * 10} for k in range(3)]), tmp_path / "tv" / "validation.parquet")
    args = ["eval", "--model", str(folder), "--task", "textvqa", "--data", str(tmp_path / "tv"), "--dtype", "float32"]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "dev"), "--device", DEVICE or "cpu"]) == 0
    rows = {d: [json.loads(line)["output"] for line in (tmp_path / d / "predictions.rank0.jsonl").open()]
            for d in ("cpu", "dev")}
    assert rows["cpu"] == rows["dev"]
