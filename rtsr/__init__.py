"""rtsr: real-time audio super-resolution to 48 kHz (AudioSR's method, streamed).

The API's names load on first use, so `rtsr.protocol`, `rtsr.client` and `rtsr.broker` import
without the engine (or torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtsr.engine import Stream
    from rtsr.model import ModelError, SuperResModel
    from rtsr.upscaler import Upscaler

__all__ = ["ModelError", "Stream", "SuperResModel", "Upscaler"]
__version__ = "0.1.0"
_WHERE = {"Stream": "rtsr.engine", "ModelError": "rtsr.model", "SuperResModel": "rtsr.model",
          "Upscaler": "rtsr.upscaler"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rtsr' has no attribute {name!r}")
