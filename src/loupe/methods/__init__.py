"""Methods: how image tokens reach the decoder. Importing this package registers them."""

from loupe.methods import flexattn, hd, lowres, visor, xattn  # noqa: F401  (registers the methods)
from loupe.methods.base import METHODS, ImageInputs, Method, MethodConfig, Step, build_method, method_options

__all__ = ["METHODS", "ImageInputs", "Method", "MethodConfig", "Step", "build_method", "method_options"]
