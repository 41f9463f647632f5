"""The embedded toy base: a tiny `UNetMotionModel` on 32x32 toy-world clips, shipped in assets/.

Same diffusers classes as the real backend, with three stand-ins, each chosen so the tiny model
spends its capacity on motion rather than on things the real base gets from pre-training:
* VAE: an exact, invertible 2x pixel-unshuffle (`PixelShuffleVAE`): 32x32x3 -> 12x16x16. A learned
  tiny VAE would add reconstruction error to every frame we measure; this adds none.
* Text: a tiny text encoder trained with the UNet (nothing to download): a learned "empty prompt"
  and a word table over the words that name the toy world's motions ("move up left", "camera zoom
  in"), as a real text-to-video base knows motion words. MIVAs never use it (they replace text,
  §3.3.2); it lets us measure whether the base can be steered at all (`train-base --text-dropout`).
  'bounce' is left unnamed on purpose (`UNNAMED`): the base sees bounce clips under the empty prompt
  only, so a bounce MIVA shows learning the base cannot be told.
* Prediction: the clean sample (x0) on a zero-terminal-SNR DDIM schedule, see `toy_scheduler`.
* Output: the UNet predicts the clean clip as an offset from the first frame, with `conv_out`
  zero-initialised, so an untrained base already copies frame 0 into every frame (clean, static)
  and training only has to learn motion.
* First frame: its clean latent replaces frame 0 at every step (as on the real base) and is also
  concatenated to every frame's input channels (PIA-style `conv_in`), which a tiny model needs to
  carry frame 0 forward.
These differences from a UNet base are `ToyBase`'s overrides of `Base`. The weights ship in fp16
(`model.safetensors`, under 10 MB) and are loaded into fp32; docs/toy-world.md says how they were
trained and how to train them again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

from ..backends.base import Base
from ..backends.animatediff import SCHEDULER_OVERRIDES, build_unet, quiet_diffusers
from ..loop import CHECKPOINT_DIR, plot_losses, read_checkpoint_tensors
from .world import WorldConfig

BASE_ID = "toy-v4"  # what adapters made for the toy base record
ASSET = Path(__file__).resolve().parents[2] / "assets" / "toy-base"
SIZE, FRAMES = 32, 16
# The world the toy base is trained on: objects start anywhere their first frame fits and may leave
# the frame (so the first frame does not tell the motion), at half the speed and a lower bounce so
# most of each motion stays visible; camera motions over a +-20 grey-level texture (the most the
# object segmentation of `miva.toy.metrics` tolerates); rotations of 8 deg/frame.
TOY_WORLD = WorldConfig(size=SIZE, frames=FRAMES, placement="free", speed=0.5, bounce_height=0.2,
                        texture_contrast=20.0, rotation_speed=8.0)
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


def toy_configs() -> tuple[dict, dict]:
    """UNet2DConditionModel and MotionAdapter configs of the toy base (12 + 12 input channels).

    Spatial attention (and so MIVA's CFA, which joins the spatial self-attentions) sits at the 8x8
    and 4x4 levels; the 16x16 level has only convolutions."""
    channels = [32, 64, 96]
    unet = dict(
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
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


def toy_scheduler() -> DDIMScheduler:
    """The toy base's DDIM schedule, rescaled so that t = T is pure noise (Lin et al. 2024).

    x0 ("sample") prediction: copying the concatenated first frame is then the identity at every t,
    and the last DDIM step returns the network's clean estimate (no leftover noise). Zero terminal
    SNR: on 16x16x16 latents the SD schedule keeps some of the clip in x_T (signal 0.04), and the
    starting noise would then help pick the motion.
    """
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, prediction_type="sample", rescale_betas_zero_snr=True,
                         **{**SCHEDULER_OVERRIDES, "timestep_spacing": "trailing"})


@dataclass
class ToyBase(Base):
    """The toy base: the clean first-frame latent joins the UNet's input channels, the UNet predicts
    the clip as an offset from it, and a tiny text encoder (if its weights have one) reads prompts."""

    text: "ToyTextEncoder | None" = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheduler.config.prediction_type != "sample":
            raise ValueError("the toy base predicts the clean sample; give it a scheduler with prediction_type='sample'.")

    def model_input(self, latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents, first[:, :, None].expand_as(latents)], dim=1)

    def model_output(self, prediction: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return prediction + first[:, :, None]

    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        if self.text is None or not any(prompts):
            return super().prompt_embeds(prompts)
        return self.text(prompts, self.null_prompt_embeds)


def new_toy(seed: int = 0) -> tuple[UNetMotionModel, torch.nn.Parameter, ToyTextEncoder]:
    """A freshly initialised toy UNet, its learned empty-prompt embedding (1, 4, 64) and text encoder."""
    unet_config, adapter_config = toy_configs()
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


def load_toy_weights(tensors: dict[str, torch.Tensor], unet, prompt: torch.Tensor, text: ToyTextEncoder,
                     prefix: str = "") -> None:
    """Copy `prefix`-named tensors of a weights file or checkpoint into the toy's modules (text if present)."""
    weights = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "unet.")}
    unet.load_state_dict(weights, strict=not prefix)  # checkpoints hold parameters only: buffers are rebuilt
    with torch.no_grad():
        prompt.copy_(tensors[prefix + "null_prompt_embeds"])
        for k, p in text.named_parameters():
            if prefix + f"text.{k}" in tensors:
                p.copy_(tensors[prefix + f"text.{k}"])


def save_toy(unet, prompt: torch.Tensor, folder: str | Path, card: dict | None = None,
             text: ToyTextEncoder | None = None) -> Path:
    """folder/model.safetensors (fp16: the toy base's figures are the same as in fp32) and config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {"null_prompt_embeds": prompt}
    if text is not None:
        tensors |= {f"text.{k}": v for k, v in text.state_dict().items()}
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"base": BASE_ID})
    unet_config, adapter_config = toy_configs()
    (folder / "config.json").write_text(json.dumps({"base": BASE_ID, "unet": unet_config, "motion_adapter": adapter_config,
                                                    **(card or {})}, indent=2) + "\n")
    return folder


def export_checkpoint(run: str | Path, folder: str | Path = ASSET, card: dict | None = None) -> Path:
    """Write folder/model.safetensors from the EMA weights of the training checkpoint in run/checkpoint, and
    folder/loss.png from its losses."""
    run, folder = Path(run), Path(folder)
    if not (run / CHECKPOINT_DIR / "state.json").is_file():
        raise FileNotFoundError(f"no training checkpoint in '{run}'; run `python -m miva.toy train-base --run {run}` first.")
    tensors = read_checkpoint_tensors(run / CHECKPOINT_DIR)
    info = json.loads((run / CHECKPOINT_DIR / "state.json").read_text())
    unet, prompt, text = new_toy()
    missing = [k for k in toy_parameters(unet, prompt, text) if f"extra.ema.{k}" not in tensors and not k.startswith("text.")]
    if missing:
        raise ValueError(f"the checkpoint in '{run}' lacks EMA weights for {len(missing)} parameters; it is not a toy-base run.")
    load_toy_weights(tensors, unet, prompt, text, prefix="extra.ema.")
    losses = info["losses"]
    card = {"trained_steps": info["step"], "seconds": round(info["seconds"]), **info["meta"],
            "final_loss_smoothed": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5), **(card or {})}
    save_toy(unet, prompt, folder, card, text if "extra.ema.text.words" in tensors else None)
    plot_losses(losses, folder / "loss.png", "toy base training loss")
    return folder


def toy_base(unet, prompt: torch.Tensor, text: ToyTextEncoder | None, base_id: str = BASE_ID) -> ToyBase:
    """The toy base over these modules, on their device and in their dtype. DCTInit is off: on the
    zero-terminal-SNR schedule x_975 keeps ~0.6% of the first frame, so DCTInit would carry almost none
    of it and only give every frame the same low-frequency noise."""
    return ToyBase(
        id=base_id, unet=unet, vae=PixelShuffleVAE().to(prompt), scheduler=toy_scheduler(), null_prompt_embeds=prompt,
        text=text, height=SIZE, width=SIZE, frames=FRAMES, description="embedded toy base (32x32 toy world)",
        vae_scale_factor=2, dct_init=False,
    )


def load_toy(folder: str | Path = ASSET, device="cpu", dtype=torch.float32) -> ToyBase:
    """The shipped toy base (safetensors only), under the base id its config.json names."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"toy base weights '{weights}' are missing; train them with `python -m miva.toy train-base`.")
    tensors = load_file(str(weights))
    card = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    unet, prompt, text = new_toy()
    load_toy_weights(tensors, unet, prompt, text)
    unet.requires_grad_(False).eval()
    text.requires_grad_(False).to(device=device, dtype=dtype)
    with quiet_diffusers():
        unet.to(device=device, dtype=dtype)
    return toy_base(unet, prompt.detach().to(device=device, dtype=dtype), text if "text.words" in tensors else None,
                    card.get("base", BASE_ID))
