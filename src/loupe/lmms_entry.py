"""The entry point lmms-eval loads to find `--model loupe` (kept apart from `loupe.lmms`, so
that importing the plug-in directly does not re-enter lmms-eval's registry mid-import)."""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    """lmms-eval's `ModelManifest` for Loupe (an entry point payload may be a callable)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="loupe", simple_class_path="loupe.lmms.LoupeLMM")
