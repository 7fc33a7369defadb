"""Methods: how image tokens reach the decoder. Importing this package registers them."""

from loupe.methods import fastv, flexattn, hd, hired, lowres, onevision, pdrop, sparsevlm, visionzip, visor, xattn  # noqa: E402,F401,I001  (registers the methods)
from loupe.methods.base import (
    METHODS,
    ImageFeatures,
    ImageInputs,
    Method,
    MethodConfig,
    MethodReport,
    RunOptions,
    Step,
    TrainDraw,
    TrainStep,
    Watch,
    build_method,
    cached_state,
    keep_state,
    method_label,
    method_options,
    parse_method,
    saved_method_options,
)

__all__ = ["METHODS", "ImageFeatures", "ImageInputs", "Method", "MethodConfig", "MethodReport", "RunOptions", "Step",
           "TrainDraw", "TrainStep", "Watch", "build_method", "cached_state", "keep_state", "method_label", "method_options",
           "parse_method", "saved_method_options"]
