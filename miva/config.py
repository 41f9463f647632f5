"""`MivaConfig`: what one adapter is made of and which base it belongs to.

Serialised to `adapter_config.json` beside `adapter_model.safetensors`, like PEFT's `LoraConfig`.
The defaults are the paper's AnimateDiff v3 reading (DESIGN.md): full-rank CFA query/output
projections, a 64-wide implicit-prompt MLP and rank-32 LoRA on the temporal attentions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1

# Projections of the motion modules' temporal attentions that get LoRA (paper §3.3.3).
TEMPORAL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# Where a base's MIVA differs from the AnimateDiff reading (the dataclass defaults). Wan2.1 (paper §4):
# rank-128 CFA projections, a 128-wide implicit prompt, no temporal LoRA (its attention is 3-D).
BASE_DEFAULTS = {
    "wan2.1-1.3b": dict(cfa_rank=128, implicit_prompt_rank=128, temporal_lora_rank=0),
    "tiny-wan": dict(cfa_rank=8, implicit_prompt_rank=8, temporal_lora_rank=0),
}


@dataclass
class MivaConfig:
    """Hyper-parameters of one MIVA and the base model it was made for.

    base: id of the base model (see `miva.backends`), checked when the adapter is loaded.
    motion: the motion this adapter animates, in the user's words ("zoom-in", "move-left").
    cross_frame_attention: add CFA layers to the spatial self-attentions (§3.3.1).
    cfa_rank: rank of the CFA query/output projections; None = full matrices (paper's 24.8M count).
    cfa_temperature: softmax temperature of the adaptive weight φ(c_t) (§3.3.1).
    implicit_prompt_rank: width of the implicit-prompt MLP replacing text cross-attention (§3.3.2);
        0 disables it.
    temporal_lora_rank: LoRA rank on the temporal attentions (§3.3.3); 0 disables it.
    masked: an M-MIVA (§3.4): it also generates its subject's mask sequence in a parallel mask stream
        (its own CFA layers; on Wan its own implicit prompt too) and biases the video's attention with
        it; needs a first-frame mask.
    """

    base: str
    motion: str = ""
    cross_frame_attention: bool = True
    cfa_rank: int | None = None
    cfa_temperature: float = 0.2
    implicit_prompt_rank: int = 64
    temporal_lora_rank: int = 32
    temporal_lora_targets: tuple[str, ...] = TEMPORAL_LORA_TARGETS
    masked: bool = False
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)  # how it was trained: steps, lr, clips (for the card)

    def __post_init__(self) -> None:
        self.temporal_lora_targets = tuple(self.temporal_lora_targets)
        if not self.base:
            raise ValueError("MivaConfig needs the id of its base model, e.g. base='animatediff-v3'.")
        for name in ("implicit_prompt_rank", "temporal_lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or a positive rank, not {getattr(self, name)}.")
        if self.cfa_rank is not None and self.cfa_rank < 1:
            raise ValueError(f"cfa_rank must be a positive rank or None (full), not {self.cfa_rank}.")
        if self.masked and not self.cross_frame_attention:
            raise ValueError("an M-MIVA (masked=True) needs cross_frame_attention: its mask stream is made of CFA layers.")
        if not self.cfa_temperature > 0:
            raise ValueError(f"cfa_temperature must be positive, not {self.cfa_temperature}.")

    @classmethod
    def for_base(cls, base: str, **overrides) -> "MivaConfig":
        """The paper's configuration for `base` (see BASE_DEFAULTS), with `overrides`."""
        return cls(base=base, **{**BASE_DEFAULTS.get(base, {}), **overrides})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["temporal_lora_targets"] = list(self.temporal_lora_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MivaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter_config.json has unknown fields {unknown}; it was written by a newer miva.")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"adapter format version {data['format_version']} is newer than this miva's {FORMAT_VERSION}; "
                "upgrade miva to load it."
            )
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "MivaConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-save or re-download the adapter.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object; re-save or re-download the adapter.")
        return cls.from_dict(data)
