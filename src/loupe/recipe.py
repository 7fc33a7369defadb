"""Training recipes as files: one flat YAML mapping of what a run is and how it trains.

    model: PATH            # the checkpoint to start from (Hugging Face folder)
    method: flexattn       # optional: convert it to this method first
    options: {hr_size: 1008}
    data: PATH             # LLaVA-format JSON (image paths relative to it, or to image_root)
    image_root: PATH       # optional
    viable_from: PATH      # optional, VISOR universal training: the split to find viable configurations on
    lr: 2.0e-5             # ... and any other `loupe.train.TrainConfig` field

`loupe train --recipe NAME_OR_FILE [KEY=VALUE ...]`: NAME is a recipe shipped in
`loupe/recipes/` (`loupe train --list-recipes`); each KEY=VALUE (YAML value) overrides one
key, `options.NAME=VALUE` one method option. The shipped recipes leave machine-specific
paths (model, data) unset where no public default exists: the command must give them.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loupe.errors import LoupeError
from loupe.train import TrainConfig

RUN_KEYS = ("model", "method", "options", "data", "image_root", "viable_from")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# VISOR's router (`loupe router train --recipe`): trained offline on pseudo-labels of a universal model.
ROUTER_KEYS = ("kind", "model", "data", "epochs", "seed", "score", "all_samples")
KINDS = {"train": ("kind", *RUN_KEYS, *TRAIN_KEYS), "router": ROUTER_KEYS}  # recipe kind -> its keys


def shipped() -> list[str]:
    """Names of the recipes in the package."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("loupe.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of a shipped recipe."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise LoupeError(f"recipe file not found: {path}")
        return path
    found = resources.files("loupe.recipes") / f"{name}.yaml"
    if not found.is_file():
        raise LoupeError(f"no recipe {name!r}: give a .yaml file or one of {shipped()}")
    return Path(str(found))


def load_recipe(name: str, kind: str = "train") -> dict[str, Any]:
    """A recipe file's mapping, its keys checked (`kind`: "train" for `loupe train`, "router")."""
    path = recipe_path(name)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LoupeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise LoupeError(f"recipe {path} must be a mapping of keys to values, not {type(recipe).__name__}")
    if recipe.get("kind", "train") != kind:
        raise LoupeError(f"recipe {path} is a {recipe.get('kind', 'train')!r} recipe; this command takes {kind!r} "
                         f"recipes ({'loupe router train' if kind == 'train' else 'loupe train'} takes the other)")
    check_keys(recipe, str(path), kind)
    return recipe


def check_keys(recipe: dict[str, Any], where: str, kind: str = "train") -> None:
    unknown = sorted(set(recipe) - set(KINDS[kind]))
    if unknown:
        raise LoupeError(f"{where}: unknown recipe key(s) {unknown}; a {kind} recipe takes {list(KINDS[kind])}")
    if not isinstance(recipe.get("options") or {}, dict):
        raise LoupeError(f"{where}: options must be a mapping of method options, not {recipe['options']!r}")


def with_overrides(recipe: dict[str, Any], overrides: list[str], kind: str = "train") -> dict[str, Any]:
    """`recipe` with each `KEY=VALUE` (VALUE read as YAML; `options.NAME=VALUE` for a method option)."""
    out = {**recipe}
    for pair in overrides:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise LoupeError(f"override {pair!r} is not KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if key.startswith("options."):
            out["options"] = {**(out.get("options") or {}), key.removeprefix("options."): value}
        else:
            out[key] = value
    check_keys(out, "overrides", kind)
    return out


def train_config(recipe: dict[str, Any]) -> TrainConfig:
    """The recipe's training settings (unset ones at `TrainConfig`'s defaults)."""
    try:
        return TrainConfig(**{k: v for k, v in recipe.items() if k in TRAIN_KEYS})  # type: ignore[arg-type]
    except TypeError as e:
        raise LoupeError(f"recipe training settings: {e}") from None


def required(recipe: dict[str, Any], key: str, name: str) -> str:
    value = recipe.get(key)
    if not value:
        raise LoupeError(f"{name} leaves {key!r} unset: pass {key}=PATH (or --{key.replace('_', '-')})")
    return str(value)
