"""Wan2.1-T2V-1.3B (`WanTransformer3DModel` + `AutoencoderKLWan`), real and tiny, built by the same code.

How Wan differs from the UNet bases, and nothing else (the pipeline, training, mixing and adapter
format are shared):
* **Latent frames.** Wan's causal video VAE compresses time 4x: F = 4k + 1 frames -> k + 1 latent
  frames. Latent frame 0 is the first frame encoded alone, so the clean first-frame latent is exact
  and replaces latent frame 0 at every step, as on AnimateDiff. The CFA's "frame 1" is latent frame 0
  and "frame i-1" the previous latent frame (the previous 4 frames): the transformer has tokens only
  per latent frame, and latent frame 0 is exactly the user's image.
* **Frame counts** must be 4k + 1 (5, 9, 13, 17, ...); others are refused with the rule stated (the
  paper uses 17).
* **Schedule.** Flow matching: x_t = (1 - s) x_0 + s eps with s = t / 1000, the model predicts the
  flow eps - x_0; sampled with `FlowMatchEulerDiscreteScheduler` at shift 3 (Wan's setting for 480p;
  the repo's own sampler, UniPC at flow shift 3, is `unipc_scheduler`).
  DCTInit noises the first frame to s = 0.975 (t = 975, as on AnimateDiff); the shared-noise
  component and AdaIN apply unchanged, on latent frames.
* **Prompt.** The empty prompt is encoded once by UMT5 (padded to 512 tokens with zeros, as Wan's
  pipeline does) and the text encoder is dropped; MIVAs' implicit prompts replace text.
* **Latents** are normalised per channel with the VAE's `latents_mean` / `latents_std`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel

from ..masks import latent_frame_union
from .base import Base, from_safetensors
from .animatediff import quiet_diffusers

BASE_ID = "wan2.1-1.3b"
TINY_ID = "tiny-wan"
HUB_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
CONFIGS = Path(__file__).parent / "configs"
FLOW_SHIFT = 3.0  # Wan's recommended shift for 480p (5.0 for 720p)
PROMPT_TOKENS = 512  # Wan pads prompt embeddings to this many tokens


@dataclass
class WanBase(Base):
    """A Wan2.1 base: the transformer sits in `unet` (the denoiser slot all bases share)."""

    temporal_factor: int = 4  # frames per latent frame (after the first)

    def __post_init__(self) -> None:
        self.vae_scale_factor = self.vae.config.scale_factor_spatial
        self.temporal_factor = self.vae.config.scale_factor_temporal

    # -- frames and latents --------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_factor + 1

    def frame_limits(self) -> tuple[int, int]:
        return self.temporal_factor + 1, 20 * self.temporal_factor + 1  # 5 to 81 frames (Wan's own maximum)

    @property
    def frame_step(self) -> int:
        return self.temporal_factor

    def check_frames(self, frames) -> int:
        low, high = self.frame_limits()
        k = self.temporal_factor
        if not isinstance(frames, int) or not low <= frames <= high or (frames - 1) % k:
            near = min(max(round((frames - 1) / k) * k + 1, low), high) if isinstance(frames, (int, float)) else 17
            raise ValueError(f"num_frames is {frames}; Wan takes {k}k+1 frames from {low} to {high} "
                             f"({low}, {low + k}, {low + 2 * k}, ...): use {near}.")
        return frames

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.unet.config.patch_size[1]

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return mean, std

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, F, H, W) in [-1, 1] -> (n, c, (F - 1) / 4 + 1, h, w) normalised latents."""
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_video(pixels[:, :, None])[:, :, 0]

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype)
        mean, std = self._stats(latents)
        return self.vae.decode(latents * std + mean).sample[0].transpose(0, 1)  # (F, 3, H, W)

    def latent_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """(F, H, W) -> (latent frames, H, W): frame 0, then the mean of each latent frame's 4 frames."""
        k = self.temporal_factor
        rest = regions[1:].unflatten(0, (-1, k)).mean(dim=1)
        return torch.cat([regions[:1], rest])

    def latent_subjects(self, masks: torch.Tensor) -> torch.Tensor:
        """(..., F, H, W) -> (..., latent frames, H, W): frame 0, then the union of each latent frame's 4 frames."""
        return latent_frame_union(masks, self.temporal_factor)

    # -- the denoiser and flow matching ---------------------------------------------------------
    def denoise(self, model_input: torch.Tensor, timestep, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The transformer's output, its inputs cast to its dtype (the latents stay fp32 next to a bf16
        transformer, as in Wan's pipeline)."""
        b, dtype = model_input.shape[0], self.unet.dtype
        timestep = torch.as_tensor(timestep, device=model_input.device).reshape(-1).expand(b)
        return self.unet(model_input.to(dtype), timestep,
                         encoder_hidden_states=prompt_embeds.to(dtype).expand(b, -1, -1)).sample

    def _sigma(self, timesteps) -> torch.Tensor:
        return torch.as_tensor(timesteps, dtype=torch.float32) / self.scheduler.config.num_train_timesteps

    def noise_levels(self, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self._sigma(timesteps).cpu()
        return 1 - sigma, sigma

    def predicted_sample(self, prediction: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        return sample - self._sigma(timestep).to(sample) * prediction

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps drawn from the scheduler's (shifted) training schedule."""
        table = self.scheduler.timesteps
        return table[torch.randint(0, len(table), (n,), generator=generator)]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(timesteps).to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        return (1 - sigma) * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents  # the flow


def scheduler(shift: float = FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def unipc_scheduler(shift: float = FLOW_SHIFT) -> UniPCMultistepScheduler:
    """The sampler Wan-AI/Wan2.1-T2V-1.3B-Diffusers ships: UniPC on flow sigmas (config kept in `configs/`)."""
    config = json.loads((CONFIGS / "wan2.1_t2v_1.3b_scheduler.json").read_text())
    return UniPCMultistepScheduler.from_config(config, flow_shift=shift)


def cast_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """`transformer` in `dtype` the way `from_pretrained(torch_dtype=dtype)` loads it: tensors of the
    modules the class keeps in fp32 (`_keep_in_fp32_modules`: norms, time embedder, modulation, rope) stay fp32."""
    keep = transformer._keep_in_fp32_modules or []
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(m in name.split(".") for m in keep) else dtype)
    return transformer


def build_transformer(config: dict, device="cpu") -> WanTransformer3DModel:
    with torch.device(device), quiet_diffusers():
        return WanTransformer3DModel.from_config(config)


def meta_transformer() -> WanTransformer3DModel:
    """The full 1.3B transformer on the meta device, from the config kept in the repo (no download)."""
    return build_transformer(json.loads((CONFIGS / "wan2.1_t2v_1.3b_transformer.json").read_text()), device="meta")


def encode_prompt(tokenizer, text_encoder, prompt: str = "", max_length: int = PROMPT_TOKENS) -> torch.Tensor:
    """(1, max_length, d) UMT5 embeddings of `prompt`, zero past its tokens, as Wan's pipeline makes them."""
    tokens = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    text_encoder.eval()  # a freshly built encoder is in training mode (dropout)
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids.to(text_encoder.device),
                              tokens.attention_mask.to(text_encoder.device)).last_hidden_state
    return embeds * tokens.attention_mask.to(embeds)[..., None]


def _finish(base_id, transformer, vae, null_prompt_embeds, height, width, frames, device, dtype, description,
            shift=FLOW_SHIFT) -> WanBase:
    transformer.requires_grad_(False).eval().to(device=device)
    vae.requires_grad_(False).eval().to(device=device)  # the VAE stays in fp32, as in Wan's pipeline
    cast_transformer(transformer, dtype)
    return WanBase(id=base_id, unet=transformer, vae=vae, scheduler=scheduler(shift),
                   null_prompt_embeds=null_prompt_embeds.to(device=device, dtype=dtype),
                   height=height, width=width, frames=frames, description=description)


def load(model: str = HUB_MODEL, device="cpu", dtype=torch.float32, base_id: str = BASE_ID, height: int = 480,
         width: int = 832, frames: int = 17, shift: float = FLOW_SHIFT, text_dtype=torch.bfloat16) -> WanBase:
    """The real base through `from_pretrained` (safetensors only) from the Hub or a folder in its layout.

    The text encoder (UMT5-XXL, 5.7B parameters: 11 GB in bf16, its stored dtype) runs once, on
    `device`, for the empty prompt, and is then dropped.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    transformer = from_safetensors(WanTransformer3DModel, model, "transformer", torch_dtype=dtype)
    vae = from_safetensors(AutoencoderKLWan, model, "vae")
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = from_safetensors(UMT5EncoderModel, model, "text_encoder", dtype=text_dtype).to(device)
    null_prompt_embeds = encode_prompt(tokenizer, text_encoder).float()
    del text_encoder
    return _finish(base_id, transformer, vae, null_prompt_embeds, height, width, frames, device, dtype, model, shift)


# -- the tiny base ---------------------------------------------------------------------------------
TINY_PROMPT_TOKENS = 8


def tiny_configs() -> tuple[dict, dict, dict]:
    """WanTransformer3DModel, AutoencoderKLWan and UMT5 configs of the tiny Wan."""
    transformer = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16,
                       out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    text = dict(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0)
    return transformer, vae, text


def tiny_tokenizer():
    """A 3-token UMT5-style tokenizer built offline: '<pad>', '</s>' (appended), '<unk>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TINY_PROMPT_TOKENS)


def tiny_components(seed: int = 0):
    """(transformer, vae, tokenizer, text encoder) of the tiny Wan, randomly initialised from `seed`."""
    from transformers import UMT5Config, UMT5EncoderModel

    transformer_config, vae_config, text_config = tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_transformer(transformer_config)
        vae = AutoencoderKLWan(**vae_config)
        text_encoder = UMT5EncoderModel(UMT5Config(**text_config))
    return transformer, vae, tiny_tokenizer(), text_encoder


def tiny(device="cpu", dtype=torch.float32, seed: int = 0, height: int = 32, width: int = 32, frames: int = 9) -> WanBase:
    """A tiny random Wan of the real classes: for tests and offline smoke runs (its videos are noise)."""
    transformer, vae, tokenizer, text_encoder = tiny_components(seed)
    null_prompt_embeds = encode_prompt(tokenizer, text_encoder, max_length=TINY_PROMPT_TOKENS)
    return _finish(TINY_ID, transformer, vae, null_prompt_embeds, height, width, frames, device, dtype, "tiny random Wan")
