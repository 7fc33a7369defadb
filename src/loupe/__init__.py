"""Loupe: high-resolution vision-language models that look closely only where it matters."""

from loupe.chat import ChatTemplate, template_for
from loupe.checkpoints import from_pretrained, save_pretrained
from loupe.config import TextConfig, VisionConfig, VLMConfig
from loupe.errors import CheckpointError, ConfigError, LoupeError
from loupe.generation import SamplingConfig, generate
from loupe.images import ImageProcessor, load_image
from loupe.methods import METHODS, method_options
from loupe.text import Tokenizer, chatml_prompt, llava_prompt, prompt
from loupe.vlm import VLM, VLMOutput

__version__ = "0.1.0"

__all__ = [
    "METHODS", "VLM", "ChatTemplate", "CheckpointError", "ConfigError", "ImageProcessor", "LoupeError",
    "SamplingConfig",
    "TextConfig", "Tokenizer", "VLMConfig", "VLMOutput", "VisionConfig", "from_pretrained", "generate",
    "chatml_prompt", "llava_prompt", "load_image", "method_options", "prompt", "save_pretrained",
    "template_for",
]
