"""MIVA: Modular Image-to-Video Adapters — learned, mixable motions for image-to-video diffusion."""

from .adapter import MAX_WEIGHT, attach, detach
from .adapter_files import load_adapter, save_adapter
from .config import MivaConfig
from .pipeline import MivaOutput, MivaPipeline

__all__ = ["MAX_WEIGHT", "MivaConfig", "MivaOutput", "MivaPipeline", "attach", "detach", "load_adapter", "save_adapter"]
__version__ = "0.1.0"
