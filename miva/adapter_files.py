"""MIVA adapter folders: adapter_config.json, adapter_model.safetensors and a README.md model card.

Reading takes safetensors only (nothing is unpickled) and checks the base, the keys and the shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import adapters_of, attach, check_adapter_name, detach
from .config import CONFIG_NAME, WEIGHTS_NAME, MivaConfig


def save_adapter(unet, name: str, folder: str | Path, card: bool = True) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and a README.md model card."""
    manager = adapters_of(unet)
    if manager is None or name not in manager.configs:
        raise KeyError(f"no adapter named '{name}' is attached, so there is nothing to save.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = manager.configs[name]
    config.save(folder)
    save_file(manager.state_dict(name), str(folder / WEIGHTS_NAME), metadata={"format": "pt", "base": config.base})
    if card:
        from .card import write_model_card

        write_model_card(folder, config, manager.parameter_report(name))
    return folder


def read_adapter(folder: str | Path) -> tuple[MivaConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder (safetensors only: nothing is unpickled)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder '{folder}' does not exist; give a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = MivaConfig.load(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the adapter folder needs {WEIGHTS_NAME} beside {CONFIG_NAME}.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-save or re-download the adapter.") from None
    return config, tensors


def load_adapter(unet, folder: str | Path, name: str | None = None, base: str | None = None) -> str:
    """Attach the adapter stored in `folder` under `name` (default: the folder's name)."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    manager = adapters_of(unet)
    expected = manager.base if manager is not None else base
    if expected is not None and config.base != expected:
        raise ValueError(f"adapter '{folder.name}' was made for base '{config.base}' but the loaded base is '{expected}'.")
    name = check_adapter_name(name or folder.name)
    manager = attach(unet, config, name, base=base)
    try:
        manager.load_state_dict(name, tensors, source=f"{folder / WEIGHTS_NAME}")
    except Exception:
        detach(unet, name)
        raise
    return name
