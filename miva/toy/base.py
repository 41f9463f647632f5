"""The embedded toy base: a tiny `UNetMotionModel` on 32x32 toy-world clips, shipped in assets/.

Same diffusers classes as the real backend, with three stand-ins, each chosen so the tiny model
spends its capacity on motion rather than on things the real base gets from pre-training:
* VAE: an exact, invertible 2x pixel-unshuffle (`PixelShuffleVAE`): 32x32x3 -> 12x16x16. A learned
  tiny VAE would add reconstruction error to every frame we measure; this adds none.
* Text: a tiny text encoder trained with the UNet (nothing to download): a learned "empty prompt"
  and a word table over the words that name the toy world's motions ("move up left", "camera zoom
  in"), as a real text-to-video base knows motion words. MIVAs never use it (they replace text,
  §3.3.2); it lets us measure whether the base can be steered at all (`train-base --text-dropout`).
  toy-v1 was trained on the empty prompt only and had no word table; toy-v2 and toy-v3 learned
  the words and obey them about half the time (README). 'bounce' is left unnamed on purpose (`UNNAMED`):
  the base sees bounce clips under the empty prompt only, so a bounce MIVA shows learning the base
  cannot be told.
* Prediction: the clean sample (x0), see `toy_scheduler`.
* Output: the UNet predicts the clean clip as an offset from the first frame, with `conv_out`
  zero-initialised, so an untrained base already copies frame 0 into every frame (clean, static)
  and training only has to learn motion. Measured: with x0 prediction but no residual, 200 steps
  still left the prediction 10x worse than copying frame 0.
* First frame: its clean latent replaces frame 0 at every step (as on the real base) and is also
  concatenated to every frame's input channels (PIA-style `conv_in`), which a tiny model needs to
  carry frame 0 forward (measured: without it, it did not learn to in 20 minutes).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from diffusers import DDIMScheduler, UNetMotionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file

from ..backends import Base
from ..backends.animatediff import SCHEDULER_OVERRIDES, build_unet, quiet_diffusers
from ..loop import plot_losses, read_checkpoint_tensors
from .world import WorldConfig

BASE_ID = "toy-v4"  # toy-v1: the first base, on the "fit" world; toy-v2: on "free"; toy-v3: "free-bold" (exports keep their id)
ASSET = Path(__file__).resolve().parents[2] / "assets" / "toy-base"
SIZE, FRAMES = 32, 16
# The worlds a toy base can be trained on (`train-base --world`; its config.json says which).
# "fit" (toy-v1's): every object's whole motion stays in the frame, so where an object starts and how
# big it is tell its motion, and a base learns to read the motion from the first frame rather than
# be steered. "free" (toy-v2's): objects start anywhere their first frame fits and may leave the
# frame; half the speed and a lower bounce keep most of each motion visible. "free-bold" (toy-v3's, see
# assets/toy-base/README.md): "free" with a camera-motion background texture of +-20 grey levels
# instead of +-12 (toy-v2 draws the faint one flat, so its zooms read as an object growing; 20 is
# the most the object segmentation of `miva.metrics` tolerates) and rotations of 8 deg/frame
# instead of 6.
_FREE = WorldConfig(size=SIZE, frames=FRAMES, placement="free", speed=0.5, bounce_height=0.2)
WORLDS = {"fit": WorldConfig(size=SIZE, frames=FRAMES), "free": _FREE,
          "free-bold": replace(_FREE, texture_contrast=20.0, rotation_speed=8.0)}
PROMPT_TOKENS, PROMPT_DIM = 4, 64
WORDS = ("move", "left", "right", "up", "down", "rotate", "cw", "ccw", "scale", "camera", "pan", "zoom", "in", "out")
UNNAMED = ("bounce",)  # motions the toy text encoder has no words for


def motion_prompt(motion: str) -> str:
    """The toy base's prompt for a toy-world motion: 'move-up-left' -> 'move up left'; '' if unnamed."""
    return "" if motion in UNNAMED else motion.replace("-", " ")


class ToyTextEncoder(nn.Module):
    """Prompt -> (tokens, d) embeddings: word i's vector plus position i's, then the empty prompt's tokens.

    The empty prompt ("") is exactly the learned null embedding, which is what MIVAs run on.
    """

    def __init__(self, dim: int = PROMPT_DIM, tokens: int = PROMPT_TOKENS):
        super().__init__()
        self.words = nn.Parameter(torch.randn(len(WORDS), dim) * 0.02)
        self.positions = nn.Parameter(torch.zeros(tokens, dim))

    def forward(self, prompts: list[str], null: torch.Tensor) -> torch.Tensor:
        """(len(prompts), tokens, d) embeddings; `null` is the (1, tokens, d) empty prompt."""
        rows = []
        for prompt in prompts:
            words = prompt.lower().replace("-", " ").split()
            unknown = [w for w in words if w not in WORDS]
            if unknown:
                raise ValueError(f"the toy base has no word {unknown[0]!r}; use words from {', '.join(WORDS)}, or no prompt.")
            if len(words) > len(self.positions):
                raise ValueError(f"the toy base reads at most {len(self.positions)} words; '{prompt}' has {len(words)}.")
            index = torch.tensor([WORDS.index(w) for w in words], dtype=torch.long, device=self.words.device)
            named = self.words[index] + self.positions[: len(words)]
            rows.append(torch.cat([named.to(null), null[0, len(words):]]))
        return torch.stack(rows)


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """An exact autoencoder: encode = pixel-unshuffle, decode = pixel-shuffle (AutoencoderKL's API)."""

    @register_to_config
    def __init__(self, factor: int = 2, scaling_factor: float = 1.0):
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        z = F.pixel_unshuffle(x, self.config.factor)  # (b, 3 r^2, h / r, w / r)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), deterministic=True))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=F.pixel_shuffle(z, self.config.factor))


def toy_configs(fine_attention: bool = False) -> tuple[dict, dict]:
    """UNet2DConditionModel and MotionAdapter configs of the toy base (12 + 12 input channels).

    Spatial attention (and so MIVA's CFA, which joins the spatial self-attentions) sits at the 8x8
    and 4x4 levels; `fine_attention` adds it at the 16x16 level too, where SD1.5 has it and the toy
    base has only convolutions (`train-base --fine-attention`)."""
    channels = [32, 64, 96]
    fine = "CrossAttn" if fine_attention else ""
    unet = dict(
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=[f"{fine}DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{fine}UpBlock2D"],
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
        sample_size=SIZE // 2,
        in_channels=24,
        out_channels=12,
    )
    adapter = dict(
        block_out_channels=channels,
        motion_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=16,
        motion_max_seq_length=32,
        use_motion_mid_block=False,
        conv_in_channels=None,
    )
    return unet, adapter


def toy_scheduler(zero_snr: bool = False) -> DDIMScheduler:
    """The toy base's DDIM schedule; `zero_snr` rescales it so that t = T is pure noise (Lin et al. 2024).

    x0 ("sample") prediction: copying the concatenated first frame is then the identity at every t,
    and the last DDIM step returns the network's clean estimate (no leftover noise). Measured: a
    v-prediction base after 300 steps was 5x worse than copying frame 0 even at t=50.
    Why zero SNR: on 16x16x16 latents the SD schedule keeps some of the clip in x_T (signal 0.04),
    so the starting noise helps pick the motion. Measured on a captioned base, 300 zero-SNR steps
    raised prompted coherence from 0.79 to 0.93 and obedience from 0.17 to 0.33 (README).
    `config.json`'s `zero_snr` says which schedule a base was trained with; `load_toy` follows it.
    """
    rescale = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, prediction_type="sample", **{**SCHEDULER_OVERRIDES, **rescale})


def new_toy(seed: int = 0, fine_attention: bool = False) -> tuple[UNetMotionModel, torch.nn.Parameter, ToyTextEncoder]:
    """A freshly initialised toy UNet, its learned empty-prompt embedding (1, 4, 64) and text encoder."""
    unet_config, adapter_config = toy_configs(fine_attention)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(unet_config, adapter_config)
        prompt = torch.nn.Parameter(torch.randn(1, PROMPT_TOKENS, PROMPT_DIM) * 0.02)
        text = ToyTextEncoder()
    with torch.no_grad():  # output = offset from the first frame, zero at the start: a fresh base copies frame 0
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    return unet, prompt, text


def toy_parameters(unet, prompt: torch.nn.Parameter, text: ToyTextEncoder) -> dict[str, torch.nn.Parameter]:
    """Everything the toy base trains, by the names its weights file and checkpoints use."""
    return ({f"unet.{k}": p for k, p in unet.named_parameters()} | {"null_prompt_embeds": prompt}
            | {f"text.{k}": p for k, p in text.named_parameters()})


def _fine_attentions(unet) -> list[tuple[str, nn.Module]]:
    """(name, transformer) of the 16x16 level's spatial attentions: the first down and the last up block."""
    levels = {"down_blocks.0": unet.down_blocks[0], f"up_blocks.{len(unet.up_blocks) - 1}": unet.up_blocks[-1]}
    return [(f"{name}.attentions.{j}", block) for name, level in levels.items()
            for j, block in enumerate(getattr(level, "attentions", []))]


def load_toy_weights(tensors: dict[str, torch.Tensor], unet, prompt: torch.Tensor, text: ToyTextEncoder,
                     prefix: str = "", grow: bool = False) -> None:
    """Copy `prefix`-named tensors of a weights file or checkpoint into the toy's modules (text if present).

    `grow`: `unet` has the 16x16 attention (`fine_attention`) and the weights may come from a base
    without it; its new transformers then get a zero output projection, so their residual passes the
    features through unchanged and the grown base computes exactly what the weights' base did."""
    weights = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "unet.")}
    new = [(name, block) for name, block in _fine_attentions(unet) if f"{name}.proj_out.weight" not in weights] if grow else []
    missing, unexpected = unet.load_state_dict(weights, strict=not (prefix or new))  # checkpoints hold parameters only: buffers are rebuilt
    if new:
        other = [k for k in missing if not k.startswith(tuple(name + "." for name, _ in new))] + unexpected
        if other:
            raise ValueError(f"these toy-base weights do not fit this UNet beyond its new 16x16 attention ({len(other)} tensors, first: {other[0]}).")
        with torch.no_grad():
            for _, block in new:
                block.proj_out.weight.zero_()
                block.proj_out.bias.zero_()
    with torch.no_grad():
        prompt.copy_(tensors[prefix + "null_prompt_embeds"])
        for k, p in text.named_parameters():
            if prefix + f"text.{k}" in tensors:  # weights from before the text encoder keep its fresh init
                p.copy_(tensors[prefix + f"text.{k}"])


def save_toy(unet, prompt: torch.Tensor, folder: str | Path, card: dict | None = None,
             text: ToyTextEncoder | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors["null_prompt_embeds"] = prompt.detach().cpu().contiguous()
    if text is not None:
        tensors |= {f"text.{k}": v.detach().cpu().contiguous() for k, v in text.state_dict().items()}
    fine = bool(_fine_attentions(unet))  # load_toy builds the UNet that the card describes
    base_id = f"{BASE_ID}-fine-attention" if fine else BASE_ID  # another UNet: adapters made for BASE_ID do not fit
    save_file(tensors, str(folder / "model.safetensors"), metadata={"base": base_id})
    unet_config, adapter_config = toy_configs(fine)
    (folder / "config.json").write_text(json.dumps({"base": base_id, "unet": unet_config, "motion_adapter": adapter_config,
                                                    **({"fine_attention": True} if fine else {}), **(card or {})}, indent=2) + "\n")
    return folder


def export_checkpoint(folder: str | Path = ASSET, card: dict | None = None) -> Path:
    """Write folder/model.safetensors from the EMA weights of the training checkpoint in folder/checkpoint, and
    folder/loss.png from its losses."""
    folder = Path(folder)
    if not (folder / "checkpoint" / "state.json").is_file():
        raise FileNotFoundError(f"no training checkpoint in '{folder}'; run `python -m miva.toy train-base` first.")
    tensors = read_checkpoint_tensors(folder / "checkpoint")
    info = json.loads((folder / "checkpoint" / "state.json").read_text())
    unet, prompt, text = new_toy(fine_attention=info["meta"].get("fine_attention", False))
    missing = [k for k in toy_parameters(unet, prompt, text) if f"extra.ema.{k}" not in tensors and not k.startswith("text.")]
    if missing:
        raise ValueError(f"the checkpoint in '{folder}' lacks EMA weights for {len(missing)} parameters; it is not a toy-base run.")
    load_toy_weights(tensors, unet, prompt, text, prefix="extra.ema.")
    losses = info["losses"]
    card = {"trained_steps": info["step"], "seconds": round(info["seconds"]), **info["meta"],
            "final_loss_smoothed": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5), **(card or {})}
    save_toy(unet, prompt, folder, card, text if "extra.ema.text.words" in tensors else None)
    plot_losses(losses, folder / "loss.png", "toy base training loss")
    return folder


def toy_world(folder: str | Path = ASSET) -> WorldConfig:
    """The world the toy base in `folder` was trained on: its clips are the ones to teach it with."""
    card = Path(folder) / "config.json"
    return WORLDS[json.loads(card.read_text()).get("world", "fit") if card.is_file() else "fit"]


def load_toy(folder: str | Path = ASSET, device="cpu", dtype=torch.float32) -> Base:
    """The shipped toy base as a `Base` (safetensors only), under the base id its config.json names."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"toy base weights '{weights}' are missing; train them with `python -m miva.toy train-base`.")
    tensors = load_file(str(weights))
    card = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    zero_snr = bool(card.get("zero_snr", False))
    unet, prompt, text = new_toy(fine_attention=card.get("fine_attention", False))
    load_toy_weights(tensors, unet, prompt, text)
    unet.requires_grad_(False).eval()
    text.requires_grad_(False)
    null = prompt.detach().to(device=device, dtype=dtype)
    text.to(device=device, dtype=dtype)
    with quiet_diffusers():
        unet.to(device=device, dtype=dtype)
    with quiet_diffusers():
        vae = PixelShuffleVAE().to(device=device, dtype=dtype)
    return Base(
        id=card.get("base", BASE_ID), unet=unet, vae=vae, scheduler=toy_scheduler(zero_snr),
        null_prompt_embeds=null, encode_prompts=(lambda prompts: text(prompts, null)) if "text.words" in tensors else None,
        height=SIZE, width=SIZE, frames=FRAMES, description="embedded toy base (32x32 toy world)",
        vae_scale_factor=2, concat_first_frame=True, residual_to_first_frame=True,
        dct_init=bool(card.get("dct_init", not zero_snr)),
    )
