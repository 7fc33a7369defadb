"""`lowres`: plain LLaVA-1.5. One native-resolution image, its tokens spliced into the
sequence at the <image> positions, every decoder layer unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from loupe.methods.base import Method, MethodConfig, register


@dataclass(frozen=True)
class LowResConfig(MethodConfig):
    name: ClassVar[str] = "lowres"


@register
class LowRes(Method):
    name = "lowres"
    config_class = LowResConfig
