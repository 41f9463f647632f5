"""`Base`: the components of a loaded base video model that the pipeline and trainer use.

`Base` is written for UNet bases with an image VAE and a DDPM-family scheduler; a backend whose model
differs overrides only where it differs (`miva.backends.wan.WanBase`, `miva.toy.base.ToyBase`): how
frames map to latent frames, how clips are encoded and decoded, how the denoiser is called and fed,
and the noise schedule. `from_safetensors` is the one way the real backends load weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from einops import rearrange


@dataclass
class Base:
    """A loaded base video model. `id` is what adapters record and are checked against."""

    id: str
    unet: torch.nn.Module  # the frozen denoiser: UNetMotionModel (or WanTransformer3DModel, see WanBase)
    vae: torch.nn.Module  # AutoencoderKL-like: encode(x).latent_dist, decode(z).sample
    scheduler: object  # a diffusers scheduler (DDIM by default)
    null_prompt_embeds: torch.Tensor  # (1, tokens, d): the empty prompt; MIVAs replace text (§3.3.2)
    height: int  # default frame size in pixels
    width: int
    frames: int = 16
    description: str = ""
    vae_scale_factor: int = 0  # pixels per latent pixel; 0: derived from an AutoencoderKL config
    dct_init: bool = True  # DCTInit (paper B.3.1) unless a call says otherwise

    def __post_init__(self) -> None:
        if not self.vae_scale_factor:
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def model_input(self, latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for (b, c, f, h, w) latents and the (b, c, h, w) clean first-frame latent."""
        return latents

    def model_output(self, prediction: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The scheduler's prediction from the denoiser's output."""
        return prediction

    # -- frames and latents (image VAE: one latent frame per frame) -------------------------------
    def latent_frames(self, frames: int) -> int:
        return frames

    def frame_limits(self) -> tuple[int, int]:
        """The smallest and largest frame count the denoiser takes (its temporal position table)."""
        return 2, getattr(self.unet.config, "motion_max_seq_length", None) or 32

    frame_step = 1  # valid frame counts are low, low + frame_step, ... (a UI slider's step)

    def check_frames(self, frames) -> int:
        low, high = self.frame_limits()
        if not isinstance(frames, int) or not low <= frames <= high:
            raise ValueError(f"num_frames is {frames}; ask for {low} to {high} frames (the base's limit).")
        return frames

    @property
    def size_multiple(self) -> int:
        """Frame sizes must be multiples of this (VAE downsampling x the UNet's downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, c, h, w) scaled latents."""
        latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return latent * self.vae.config.scaling_factor

    def encode_video(self, pixels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(n, 3, F, H, W) in [-1, 1] -> (n, c, latent_frames(F), h, w) scaled latents."""
        return encode_frames(self.encode_image, pixels, chunk)

    def decode_video(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(1, c, f, h, w) latents -> (F, 3, H, W) pixels in [-1, 1], a few frames at a time."""
        frames = latents[0].transpose(0, 1) / self.vae.config.scaling_factor  # (f, c, h, w)
        return torch.cat([self.vae.decode(frames[i : i + chunk].to(self.vae.dtype)).sample
                          for i in range(0, len(frames), chunk)])

    def latent_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """(F, H, W) per-frame region weights -> (latent_frames(F), H, W)."""
        return regions

    def latent_subjects(self, masks: torch.Tensor) -> torch.Tensor:
        """(..., F, H, W) per-frame subject masks -> (..., latent_frames(F), H, W): M-MIVA's S per latent frame."""
        return masks

    # -- the denoiser and its noise schedule (DDPM family) --------------------------------------
    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, d) text embeddings; MIVAs never need them (they run on the empty prompt)."""
        if any(prompts):
            raise ValueError(f"base '{self.id}' was loaded without its text encoder; leave the prompt empty.")
        return self.null_prompt_embeds.expand(len(prompts), -1, -1)

    def denoise(self, model_input: torch.Tensor, timestep, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output for (b, c, f, h, w) input and one prompt, or one per clip;
        UNetMotionModel wants prompts per frame."""
        b, f = model_input.shape[0], model_input.shape[2]
        embeds = (prompt_embeds.expand(b * f, -1, -1) if prompt_embeds.shape[0] == 1
                  else prompt_embeds.repeat_interleave(f, dim=0))  # (b f, tokens, d)
        return self.unet(model_input, timestep, encoder_hidden_states=embeds).sample

    def noise_levels(self, timesteps: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) scales of x_t = signal x_0 + noise eps at these timesteps."""
        alpha_bar = self.scheduler.alphas_cumprod[torch.as_tensor(timesteps, device="cpu").long()]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def predicted_sample(self, prediction: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The one-step estimate of x_0 from the scheduler's prediction at x_t (M-MIVA's mask proxy, §3.4.2)."""
        signal, noise = (x.to(sample) for x in self.noise_levels(timestep))
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            return prediction
        if kind == "v_prediction":
            return signal * sample - noise * prediction
        return (sample - noise * prediction) / signal

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return {"sample": latents, "epsilon": noise}[kind]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def set_gradient_checkpointing(denoiser: torch.nn.Module, enabled: bool) -> None:
    """Recompute `denoiser`'s activations in the backward pass: diffusers' own checkpointing, and each
    AnimateDiff motion module, which `UNetMotionModel` runs outside its checkpointed resnets and which
    otherwise holds most of a training step's activations."""
    if enabled:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    for module in denoiser.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            if enabled:
                module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))
            else:
                module.__dict__.pop("forward", None)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def encode_frames(encode_image, pixels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(n, 3, F, H, W) -> (n, c, F, h, w) with an image encoder taking (b, 3, H, W), `chunk` frames at a time."""
    frames = rearrange(pixels, "n c f h w -> (n f) c h w")
    latents = torch.cat([encode_image(frames[i : i + chunk]) for i in range(0, len(frames), chunk)])
    return rearrange(latents, "(n f) c h w -> n c f h w", n=len(pixels))


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # weight files that need unpickling


def from_safetensors(cls, model: str | Path, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained` from a Hub id or local folder with `use_safetensors=True`; a local folder
    holding pickled weights and no safetensors is refused before anything is read."""
    folder = Path(model, subfolder or "")
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(f.name for pattern in PICKLED for f in folder.glob(pattern))
        if pickled:
            raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickled)}) and MIVA loads "
                             f"safetensors only: convert them to .safetensors first.")
    return cls.from_pretrained(str(model), subfolder=subfolder, use_safetensors=True, **kwargs)
