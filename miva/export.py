"""A MIVA's temporal LoRA as a diffusers LoRA file, for `AnimateDiffPipeline.load_lora_weights`.

The file is what diffusers itself writes (`StableDiffusionLoraLoaderMixin.save_lora_weights`): PEFT
keys `unet.<motion module path>.lora_A.weight` / `lora_B.weight` and, in the safetensors metadata under
`lora_adapter_metadata`, the `LoraConfig` arguments (rank, alpha = rank, the exact target modules), so
the loader rebuilds the very layers the adapter was trained with and scales them as MIVA weight 1 does
(`pipe.set_adapters(name, w)` is MIVA weight w); a loader that ignores the metadata infers the rank
from the shapes and takes alpha = rank, the same scale. The cross-frame attention, implicit prompt and M-MIVA
mask stream are MIVA processors with no diffusers equivalent and are left out: loaded alone, the
temporal LoRA is only part of the motion.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .adapter_files import read_adapter
from .card import PART_NAMES, part_of
from .catalogue import resolve_adapter

WAN_BASES = ("wan2.1-1.3b", "tiny-wan")  # bases whose MIVA has no temporal LoRA (3-D attention)


def lora_state_dict(adapter: str | Path) -> tuple[dict, dict, list[str]]:
    """(PEFT tensors without prefix, LoraConfig dict, titles of the parts left out) of an adapter folder
    or a name in adapters/; refused in one sentence when it has no temporal LoRA."""
    folder = resolve_adapter(adapter)
    config, tensors = read_adapter(folder)
    if config.base in WAN_BASES:
        raise ValueError(f"adapter '{folder.name}' is for base '{config.base}', whose MIVA has no temporal LoRA to "
                         "export (Wan's attention is 3-D, so the MIVA is cross-frame attention and an implicit prompt "
                         "only, which diffusers' LoRA loaders cannot hold).")
    lora = {key: tensor for key, tensor in tensors.items() if part_of(key) == "temporal_lora"}
    if not config.temporal_lora_rank or not lora:
        raise ValueError(f"adapter '{folder.name}' has no temporal LoRA (temporal_lora_rank is "
                         f"{config.temporal_lora_rank}), so there is nothing a LoRA file could hold.")
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in lora})
    rank = config.temporal_lora_rank
    lora_config = {"r": rank, "lora_alpha": rank, "target_modules": targets}  # `LoraConfig` kwargs, any peft version
    left_out = [PART_NAMES[part].split(" (")[0] for part in PART_NAMES if part != "temporal_lora"
                and any(part_of(key) == part for key in tensors)]
    return lora, lora_config, left_out


def export_lora(adapter: str | Path, out_path: str | Path) -> Path:
    """Write the temporal LoRA of an AnimateDiff-base adapter (a folder, or a name in adapters/) to
    `out_path` (.safetensors) as a diffusers LoRA file; warns once about the MIVA-only parts left out.

    Load it with `AnimateDiffPipeline.load_lora_weights(folder, weight_name=file_name, adapter_name=...)`.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"the LoRA file '{out_path.name}' must end in .safetensors (diffusers loads that format).")
    lora, lora_config, left_out = lora_state_dict(adapter)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        out_path.parent, unet_lora_layers=lora, unet_lora_adapter_metadata=lora_config, weight_name=out_path.name,
        safe_serialization=True,
    )
    if left_out:
        warnings.warn(f"{out_path.name} holds the temporal LoRA only; the MIVA-only parts ({', '.join(left_out)}) "
                      "are left out, so diffusers reproduces only part of the motion.", UserWarning, stacklevel=2)
    return out_path
