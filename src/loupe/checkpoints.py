"""Checkpoints: Hugging Face LLaVA folders <-> Loupe models, safetensors only.

One key map, used by production loading, saving and the tests alike:

- `LAYOUT_RULES` rewrite every key layout found in the wild into the layout the
  published `llava-hf/llava-1.5-7b-hf` files use (`language_model.model.layers.N...`,
  `vision_tower.vision_model...`). Layouts: published llava-hf; transformers >= 4.52
  in memory (`model.language_model...`, `lm_head`); transformers 5 `save_pretrained`
  (`vision_tower.encoder...`, no `vision_model`).
- `PREFIXES` map that published layout to Loupe's module names, both ways.

Loading builds the model on the meta device and assigns each tensor straight from the
memory-mapped file at the requested dtype, so a bf16 7B checkpoint loads in bf16 without
ever materialising an fp32 copy. Pickled `.bin`/`.pt` files are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loupe.config import VLMConfig
from loupe.errors import CheckpointError, LoupeError, preview
from loupe.files import folder_atomic, read_json
from loupe.methods import MethodConfig, method_options, saved_method_options
from loupe.vlm import VLM

# Any layout in the wild -> the published llava-hf layout. Applied in order.
LAYOUT_RULES: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
]

# Keys real checkpoints carry that no Loupe module reads (LLaVA never applies CLIP's
# post-layernorm, OneVision neither SigLIP's nor its pooling head, where a checkpoint keeps
# one; old exports carry RoPE and position-id buffers).
IGNORED = re.compile(r"^vision_tower\.vision_model\.(post_layernorm|head)\.|rotary_emb\.inv_freq$|position_ids$")

# (Loupe prefix, published llava-hf prefix); first match wins in either direction.
PREFIXES: list[tuple[str, str]] = [
    ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
    ("packing.image_newline", "image_newline"),
    ("decoder.lm_head.", "language_model.lm_head."),
    ("decoder.", "language_model.model."),
    ("method.", "loupe_method."),
]

LOUPE_CONFIG = "loupe.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model folder carries besides weights and config, copied along by `loupe convert`.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "preprocessor_config.json", "generation_config.json", "chat_template.json", "added_tokens.json")


def to_published(key: str) -> str:
    for pattern, replacement in LAYOUT_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def hf_to_loupe(key: str) -> str | None:
    """Loupe parameter name of a checkpoint key in any known layout (None: ignored key)."""
    key = to_published(key)
    if IGNORED.search(key):
        return None
    for loupe, hf in PREFIXES:
        if key.startswith(hf):
            return loupe + key[len(hf):]
    return "?" + key  # unknown: reported as unexpected


def loupe_to_hf(name: str) -> str:
    for loupe, hf in PREFIXES:
        if name.startswith(loupe):
            return hf + name[len(loupe):]
    raise KeyError(name)


# ---- reading ----------------------------------------------------------------------------
def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, refusing pickled checkpoints."""
    if folder.is_file():
        folder_kind = "pickled checkpoint" if folder.suffix in PICKLE_SUFFIXES else "file"
        raise CheckpointError(f"{folder} is a {folder_kind}, not a checkpoint folder; Loupe loads Hugging Face "
                              "folders with config.json and *.safetensors")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return _index_files(folder, index)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(f"{folder} holds only pickled weights ({preview(pickled)}); Loupe never unpickles "
                              "a checkpoint (it can run arbitrary code). Convert it to safetensors first, e.g. "
                              "with transformers' save_pretrained(..., safe_serialization=True).")
    raise CheckpointError(f"no *.safetensors weights in {folder}")


def _index_files(folder: Path, index: Path) -> list[Path]:
    """The shards an index names: a valid `weight_map` of key -> file, every file inside the folder."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a JSON object with a weight_map: {e}") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of key -> shard file name, not "
                              f"{str(weight_map)[:80]!r}")
    root = folder.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        file = (folder / name).resolve()
        if file.parent != root:  # "../other/model.safetensors", "/abs/path", "sub/dir/x"
            raise CheckpointError(f"{index} names shard {name!r}, which is not a file of {folder}; an index may "
                                  "only name files beside it")
        files.append(folder / name)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index} names shard(s) that are not there: {preview(missing)}")
    return files


def read_config(folder: Path) -> tuple[VLMConfig, MethodConfig | None]:
    """The model config, and the method the checkpoint was converted to (None: base LLaVA)."""
    loupe_file, hf_file = folder / LOUPE_CONFIG, folder / "config.json"
    if loupe_file.exists():
        d = read_json(loupe_file, dict, "model settings", CheckpointError)
        model, method = d.get("model"), d.get("method")
        if not isinstance(model, dict) or not isinstance(method, dict) or not isinstance(method.get("name"), str):
            raise CheckpointError(f"{loupe_file} must hold {{\"model\": {{...}}, \"method\": {{\"name\": ..., ...}}}}; "
                                  f"it has keys {sorted(d)}")
        method = dict(method)
        name = method.pop("name")
        try:
            return VLMConfig.from_dict(model), saved_method_options(name, **method)
        except LoupeError as e:
            raise type(e)(f"{loupe_file}: {e}") from None
    if not hf_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        cfg = VLMConfig.from_hf(read_json(hf_file, dict, "model settings", CheckpointError))
    except CheckpointError:
        raise
    except LoupeError as e:
        raise type(e)(f"{hf_file}: {e}") from None  # the same class (ConfigError stays one), the file named
    return with_preprocessor(cfg, folder / "preprocessor_config.json"), None


def with_preprocessor(cfg: VLMConfig, path: Path) -> VLMConfig:
    """`cfg` with the pixel mean/std of a Hugging Face preprocessor_config.json, if there is one."""
    if not path.is_file():
        return cfg
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    mean, std = d.get("image_mean", cfg.image_mean), d.get("image_std", cfg.image_std)
    return dataclasses.replace(cfg, image_mean=tuple(mean), image_std=tuple(std))


def iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) pairs, memory-mapped, on `device`. A truncated or corrupt file,
    or a key two files both hold, is a CheckpointError naming the file (and key)."""
    seen: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key in seen:
                        raise CheckpointError(f"weight {key!r} is in both {seen[key].name} and {file.name} "
                                              f"({file.parent}); which one is meant is ambiguous")
                    seen[key] = file
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' SafetensorError, or an OSError from the memory map
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{str(e).splitlines()[0][:200]}") from None


def resolve_dtype(stored: torch.dtype, dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """dtype None keeps the checkpoint's, except fp16 on CPU, which becomes bf16 (fp16
    matmuls are ~100x slower than fp32 on CPU). fp16 asked for on CPU runs, with a warning."""
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on CPU is very slow (no fp16 matmul kernels); use dtype=torch.bfloat16 or "
                      "torch.float32", stacklevel=3)
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cpu" and stored == torch.float16 else stored


def from_pretrained(
    path: str | os.PathLike[str],
    method: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **options: object,
) -> VLM:
    """Load a LLaVA checkpoint folder (HF layout) or a Loupe-converted one.

    method: None keeps the checkpoint's method ("lowres" for a plain LLaVA checkpoint);
        another name builds that method on top, initialising its new weights from the
        base model as `loupe convert` would. `options` are that method's options.
    dtype: None keeps the stored dtype (fp16 on CPU becomes bf16).
    """
    from loupe.distributed import check_device

    folder, device = Path(path), check_device(device) if isinstance(device, str) else device
    files = safetensors_files(folder)
    cfg, stored_method = read_config(folder)
    wanted = _wanted_method(method, stored_method, options)
    named = ((hf_to_loupe(key), tensor) for key, tensor in iter_tensors(files, device))
    new_method = stored_method is None or wanted.name != stored_method.name
    return assemble(cfg, wanted, named, dtype=dtype, device=device, source=str(folder), new_method=new_method)


def assemble(cfg: VLMConfig, method: MethodConfig, named: Iterable[tuple[str | None, torch.Tensor]], *,
             dtype: torch.dtype | None, device: torch.device, source: str, new_method: bool) -> VLM:
    """Build the model on meta and assign (Loupe name, tensor) pairs at the target dtype.
    Names None are skipped; `new_method` lets the method's own weights be absent (they
    are then initialised from the base model)."""
    with torch.device("meta"):
        model = VLM(cfg, method)
    state: dict[str, torch.Tensor] = {}
    target_dtype = None
    shapes = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in named:
        if name is None:
            continue
        _check_tensor(name, tensor, shapes.get(name), source)
        if target_dtype is None and tensor.is_floating_point():
            target_dtype = resolve_dtype(tensor.dtype, dtype, device)
        state[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
    if cfg.text.tie_word_embeddings:
        state.pop("decoder.lm_head.weight", None)  # transformers' in-memory layout keeps the tied copy
    _check_keys(model, state, source, new_method=new_method)
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_new(model, device, target_dtype or torch.float32)
    return model.eval()


def _check_tensor(name: str, tensor: torch.Tensor, expected: torch.Tensor | None, source: str) -> None:
    """One stored tensor against the model's: shape, a floating dtype, finite values. The last
    is streamed, each tensor as it is assigned, through its sum: a NaN or inf anywhere makes
    the sum non-finite. On a 2-core CPU that costs ~0.4 s per 7B bf16 parameters, where
    `isfinite().all()` costs ~24 s (benchmarks/load_checks.py). Only a non-finite sum pays for
    the exact count, and a finite tensor whose sum overflows is let through."""
    if expected is None:
        return  # an unexpected key: `_check_keys` names all of them at once
    if tuple(tensor.shape) != tuple(expected.shape):
        raise CheckpointError(f"{source}: weight {loupe_to_hf(name)} has shape {tuple(tensor.shape)}, but the "
                              f"config makes it {tuple(expected.shape)}")
    if expected.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(f"{source}: weight {loupe_to_hf(name)} is stored as {tensor.dtype}, not a floating "
                              "type")
    if tensor.is_floating_point() and not math.isfinite(float(tensor.sum())):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad == 0:
            return  # finite values whose sum overflows
        raise CheckpointError(f"{source}: weight {loupe_to_hf(name)} holds {bad} non-finite value(s) (NaN or "
                              "inf): the checkpoint is corrupt or was saved from a diverged run")


def _wanted_method(method: str | None, stored: MethodConfig | None, options: dict[str, object]) -> MethodConfig:
    if method is None and stored is not None and not options:
        return stored
    name = method or (stored.name if stored else "lowres")
    if stored is not None and stored.name == name:  # options given on top of the checkpoint's own
        saved = {k: v for k, v in stored.to_dict().items() if k != "name"}
        return method_options(name, **{**saved, **options})
    return method_options(name, **options)


def _check_keys(model: VLM, state: dict[str, torch.Tensor], folder: str, new_method: bool) -> None:
    expected = set(model.state_dict().keys())
    if model.cfg.text.tie_word_embeddings:
        expected.discard("decoder.lm_head.weight")
    found = set(state)
    # A method's buffers (FlexAttention's training gate) may be absent from a checkpoint written
    # before they existed: they get their initial values (`Method.init_buffers`).
    buffers = {f"method.{name}" for name, _ in model.method.named_buffers()}
    missing = sorted(k for k in expected - found - buffers if not (new_method and k.startswith("method.")))
    unexpected = sorted(loupe_to_hf(k) if not k.startswith("?") else k[1:] for k in found - expected)
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {len(missing)} weight(s) the model needs: "
                              f"{preview([loupe_to_hf(k) for k in missing])}")
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} has {len(unexpected)} weight(s) the model does not use: "
                              f"{preview(unexpected)}")


def _materialise_new(model: VLM, device: torch.device, dtype: torch.dtype) -> None:
    """Tie the LM head if asked, and give the method's new weights (still on meta when
    the checkpoint did not have them) storage initialised from the base model."""
    if model.cfg.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    if any(p.is_meta for p in model.method.parameters()):
        model.method.to_empty(device=device).to(dtype)
        model.method.init_from_base(model)
        model.method.init_buffers()
    elif any(b.is_meta for b in model.method.buffers()):
        for module in model.method.modules():  # only buffers are left on meta: give them storage
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_meta:
                    setattr(module, name, torch.empty(buf.shape, device=device, dtype=dtype))
        model.method.init_buffers()
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if still_meta:
        raise CheckpointError(f"weights left uninitialised after loading: {preview(still_meta)}")


# ---- writing ----------------------------------------------------------------------------
def save_pretrained(model: VLM, path: str | os.PathLike[str], *, overwrite: bool = False,
                    shard_bytes: int = 5 * 2**30, state: dict[str, torch.Tensor] | None = None,
                    files: Iterable[Path] = ()) -> None:
    """Write `model` as a HF-layout folder (+ loupe.json recording the method), atomically:
    everything goes to a temporary folder that replaces `path` only when complete. `state`
    replaces `model.state_dict()` (e.g. the full weights an FSDP2-sharded model gathered);
    `files` (a tokenizer.json, a preprocessor_config.json) are copied in."""
    with folder_atomic(path, overwrite, CheckpointError) as tmp:
        _write_weights(model, tmp, shard_bytes, state)
        for f in files:
            shutil.copyfile(f, tmp / Path(f).name)
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
        meta = {"model": model.cfg.to_dict(), "method": model.method.options.to_dict()}
        (tmp / LOUPE_CONFIG).write_text(json.dumps(meta, indent=2))


def _write_weights(model: VLM, folder: Path, shard_bytes: int, full: dict[str, torch.Tensor] | None = None) -> None:
    full = model.state_dict() if full is None else full
    state = {loupe_to_hf(k): v.detach().contiguous() for k, v in full.items()
             if not (model.cfg.text.tie_word_embeddings and k == "decoder.lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], method: str, *,
            options: dict[str, object] | None = None, clip: str | os.PathLike[str] | None = None,
            dtype: torch.dtype | None = None, overwrite: bool = False) -> VLM:
    """`loupe convert`: the checkpoint `src` (a LLaVA folder, or with `clip` the FlexAttention
    release's LLM folder) as a `method` model in `dst`, its new weights initialised from the
    base, the tokenizer copied along."""
    options = options or {}
    if clip is not None:
        from loupe.release import from_flexattention_release
        if method != "flexattn":
            raise CheckpointError(f"--clip reads the FlexAttention release, which is a flexattn model, not {method!r}")
        model = from_flexattention_release(src, clip, dtype=dtype, **options)
    else:
        model = from_pretrained(src, method, dtype=dtype, **options)
    # the side files go into the new folder before it replaces the old (dst may be src itself)
    side = [Path(src) / n for n in SIDE_FILES if (Path(src) / n).is_file()]
    save_pretrained(model, dst, overwrite=overwrite, files=side)
    return model


def model_info(model: VLM) -> dict[str, object]:
    """Method, dtype, parameter counts per part, image tokens and config (`loupe info`)."""
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "method": model.method.options.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": {"vision_tower": count(model.vision_tower), "projector": count(model.projector),
                       "decoder": count(model.decoder), "method": count(model.method), "total": count(model)},
        "image_tokens_per_image": model.method.tokens_label(),
        "config": model.cfg.to_dict(),
    }
