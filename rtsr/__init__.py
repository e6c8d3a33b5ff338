"""rtsr: real-time audio super-resolution to 48 kHz (AudioSR's method, streamed)."""

from rtsr.engine import Stream
from rtsr.model import ModelError, SuperResModel
from rtsr.upscaler import Upscaler

__all__ = ["ModelError", "Stream", "SuperResModel", "Upscaler"]
__version__ = "0.1.0"
