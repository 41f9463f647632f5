"""`MivaPipeline`: image-to-video sampling with any number of MIVAs (paper §3, Alg. 1, eq. S4)."""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import masks as masks_lib
from . import schedules
from .adapter import MivaCall, adapters_of, check_weight, detach
from .adapter_files import load_adapter
from .backends import load_base
from .backends.base import Base
from .catalogue import resolve_adapter
from .data import clips_to_tensor
from .mask_streams import MaskStreams, composite_owners
from .media import fit_image, image_to_tensor, load_image, save_video

MIX_MODES = ("composite", "attention")  # how a mix with M-MIVAs shares a call (`MivaPipeline.__call__`)


@dataclass
class MivaOutput:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int = 8
    latents: torch.Tensor | None = None  # (1, c, F, h, w) final latents, before decoding
    regions: torch.Tensor | None = None  # (F, H, W) unified mask of a masked mix (eq. S5): 0 = background
    subject_masks: dict[str, torch.Tensor] | None = None  # M-MIVA -> (F, H, W) its last predicted mask sequence
    mask_passes: int = 0  # denoising steps that ran the M-MIVA mask streams (the rest reused the cache)

    def save(self, path: str | Path) -> Path:
        return save_video(self.frames, path, fps=self.fps)


class MivaPipeline:
    """Animate a first frame with the attached MIVAs.

    The base stays frozen; adapters are attached by `load_adapter` and chosen per call with
    weights. Every call gets its own scheduler and generator, so calls do not share sampling state.
    """

    def __init__(self, base: Base):
        self.base = base

    @classmethod
    def from_base(cls, name: str = "animatediff-v3", device=None, dtype=None, **kwargs) -> "MivaPipeline":
        """The named base (see `miva.backends.load_base`; device None: a GPU if there is one)."""
        return cls(load_base(name, device=device, dtype=dtype, **kwargs))

    # -- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict:
        manager = adapters_of(self.base.unet)
        return dict(manager.configs) if manager else {}

    def load_adapter(self, spec: str | Path, name: str | None = None) -> str:
        """Attach an adapter folder (or a name in adapters/); returns the name it is attached as."""
        folder = resolve_adapter(spec)
        name = name or folder.name
        if name in self.adapters:
            return name
        return load_adapter(self.base.unet, folder, name=name, base=self.base.id)

    def unload_adapter(self, name: str | None = None) -> None:
        detach(self.base.unet, name)

    def compile(self, mode: str | None = None) -> "MivaPipeline":
        """Compile the denoiser in place with `torch.compile` (static shapes; `mode` as torch's, e.g.
        "reduce-overhead" for CUDA graphs). The first call with new shapes, adapters or weights compiles
        (minutes); later ones reuse it. Attached adapters and merged LoRA weights work unchanged."""
        self.base.unet.compile(mode=mode, dynamic=False)
        return self

    # -- sampling -------------------------------------------------------------------------------
    def _check(self, num_frames, num_inference_steps, guidance_scale, height, width, shared_noise_ratio, dct_cutoff,
               dct_timestep) -> None:
        self.base.check_frames(num_frames)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps is {num_inference_steps}; use at least 1 step (25-50 is typical).")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and 0 <= guidance_scale <= 20):
            raise ValueError(f"guidance_scale is {guidance_scale}; use a number from 0 to 20 (1 = the paper's setting).")
        multiple = self.base.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"the video size {width}x{height} must be a positive multiple of {multiple} on this base.")
        if not (math.isfinite(shared_noise_ratio) and 0 <= shared_noise_ratio <= 1):
            raise ValueError(f"shared_noise_ratio is {shared_noise_ratio}; use a number from 0 to 1 (the paper uses 0.05).")
        if not (math.isfinite(dct_cutoff) and 0 < dct_cutoff <= 1):
            raise ValueError(f"dct_cutoff is {dct_cutoff}; use a number above 0 and at most 1 (the paper uses 0.23).")
        train_steps = self.base.scheduler.config.num_train_timesteps
        if not (isinstance(dct_timestep, int) and 0 <= dct_timestep < train_steps):
            raise ValueError(f"dct_timestep is {dct_timestep}; use a whole number from 0 to {train_steps - 1} (the paper uses 975).")

    def prepare_first_frame(self, image, height: int, width: int) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1]: loaded, made RGB, resized to cover and centre-cropped."""
        return image_to_tensor(fit_image(load_image(image), width, height))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, c, h, w) latents of single frames (a first frame)."""
        return self.base.encode_image(pixels)

    @torch.no_grad()
    def encode_clips(self, clips: list[np.ndarray]) -> torch.Tensor:
        """(F, H, W, 3) uint8 clips -> (n, c, f, h, w) latents, one clip at a time."""
        return torch.cat([self.base.encode_video(clips_to_tensor([clip])) for clip in clips])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(1, c, f, h, w) latents -> (F, H, W, 3) uint8."""
        pixels = self.base.decode_video(latents)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def initial_latents(self, first, num_frames, scheduler, generator, shared_noise_ratio, dct_init, dct_cutoff,
                        dct_timestep) -> torch.Tensor:
        """x_T by Algorithm 1: shared noise, then DCTInit from the first frame (each switchable).

        `num_frames` counts latent frames."""
        _, c, h, w = first.shape
        noise = schedules.shared_noise((1, c, num_frames, h, w), ratio=shared_noise_ratio, generator=generator,
                                       device=generator.device, dtype=torch.float32).to(first.device)
        if not dct_init:
            return (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(first.dtype)
        levels = tuple(float(x) for x in self.base.noise_levels(dct_timestep))
        return schedules.dct_init(first.float(), noise, cutoff=dct_cutoff, levels=levels).to(first.dtype)

    @staticmethod
    def hold_first_frame(latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The image-to-video constraint: the clean first-frame latent replaces frame 0 (before every step
        and after the last)."""
        latents[:, :, 0] = first
        return latents

    def predict(self, latents, first, timestep, adapters: dict[str, float], guidance_scale: float,
                streams: MaskStreams | None = None, call: MivaCall | None = None):
        """The scheduler's prediction (ε, v or x0) with the adapters mixed by eq. S4.

        guidance_scale g is motion guidance: p_base + g (p_miva - p_base), p_base being the base with
        every adapter off; g = 1 (the paper's setting) needs one UNet pass per step. With `streams`,
        the M-MIVAs' mask clips run in the same pass (one batch: video, then each mask clip) and
        (video prediction, mask predictions) is returned. `call` is the sampling call's state
        (`MivaAdapters.call`); without one, the pass opens its own.
        """
        base, manager = self.base, adapters_of(self.base.unet)
        if call is None and manager is not None:
            with manager.call() as call:
                return self.predict(latents, first, timestep, adapters, guidance_scale, streams, call)
        inputs, firsts = [base.model_input(latents, first)], [first]
        if streams is not None:
            for k in range(len(streams.names)):
                inputs.append(base.model_input(streams.latents[k : k + 1], streams.firsts[k : k + 1]))
                firsts.append(streams.firsts[k : k + 1])
        b = latents.shape[0]

        def run(weights, joint=False):
            if call is not None:
                call.set(weights=weights, streams=(None, *streams.names) if joint else (None,))
            x = torch.cat(inputs) if joint else inputs[0]
            out = base.denoise(x, timestep, base.null_prompt_embeds).split(b)
            return [base.model_output(o, f) for o, f in zip(out, firsts)]

        outputs = run(adapters, joint=streams is not None)
        prediction = outputs[0]
        if guidance_scale != 1 and adapters:
            base_prediction = run({})[0]
            prediction = base_prediction + guidance_scale * (prediction - base_prediction)
        return prediction if streams is None else (prediction, torch.cat(outputs[1:]))

    def predict_composite(self, latents, first, timestep, adapters: dict[str, float], guidance_scale: float,
                          streams: MaskStreams, owners: list[torch.Tensor], due: bool, call: MivaCall | None = None):
        """A mix with M-MIVAs, composited: one UNet pass per M-MIVA, as if it were alone in the call (its
        subject mask biases the attention with eq. 3, its mask clip runs with it when `due`), one pass
        for the plain adapters together (on their regions, unbiased: no M-MIVA is active in it), and
        each subject's path (its `owners` weights, from `mask_streams.composite_owners`) takes its own
        M-MIVA's prediction, the rest of the frame the plain adapters' (without any: the mean of the
        M-MIVAs' passes, which all hold it still).

        Each M-MIVA learned to hold everything but its subject still, so in one shared pass each
        holds the other subjects (and a plain adapter's background) still as well; here everything is
        drawn by a pass in which the adapter meant for it acts alone. Costs one UNet pass per M-MIVA,
        one for the plain adapters and one more for motion guidance. Returns (video prediction, mask
        predictions or None).
        """
        names = streams.names
        plain = {name: w for name, w in adapters.items() if name not in names and w != 0}
        predictions, mask_predictions = [], []
        for k, name in enumerate(names):
            out = self.predict(latents, first, timestep, {name: adapters[name]}, 1.0, streams.one(k) if due else None, call)
            predictions.append(out[0] if due else out)
            if due:
                mask_predictions.append(out[1])
        rest = self.predict(latents, first, timestep, plain, 1.0, call=call) if plain else torch.stack(predictions).mean(0)
        prediction = rest
        for owner, p in zip(owners, predictions):
            prediction = prediction + owner * (p - rest)
        if guidance_scale != 1:
            base_prediction = self.predict(latents, first, timestep, {}, 1.0, call=call)
            prediction = base_prediction + guidance_scale * (prediction - base_prediction)
        return prediction, torch.cat(mask_predictions) if due else None

    @torch.no_grad()
    def __call__(
        self,
        image,
        adapters: dict[str, float] | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        shared_noise_ratio: float = 0.05,
        dct_init: bool | None = None,
        dct_cutoff: float = 0.23,
        dct_timestep: int = 975,
        adain: bool = True,
        fps: int = 8,
        callback: Callable[[int, int], None] | None = None,
        masks: dict[str, object] | None = None,
        mask_steps: list[int] | str | None = None,
        mask_tolerance: float | None = None,
        mix: str = "composite",
    ) -> MivaOutput:
        """Animate `image` with `adapters` ({name: weight}, weights in [0, 2]; None = all at 1).

        `masks` confines adapters to regions: {name: one mask or one per frame}, fitted like the
        first frame (see `miva.masks`). Overlaps go to the adapter listed later; in a mix with
        masked adapters, an unmasked adapter acts on the background (paper B.2.1). For an M-MIVA the
        mask is its subject on the first frame: it generates the subject's mask sequence itself and
        biases the video's attention with it (§3.4), regenerating it only at `mask_steps` (default:
        the paper's {0, 5, ..., 35} of 50, scaled; "all" = every step) and not at all once it changes
        less than `mask_tolerance` between two of them. `dct_init` None follows the base (`Base.dct_init`).
        `mix` decides how a mix with M-MIVAs shares the video: "composite" (default) runs the UNet once
        per M-MIVA, each as if alone, and once for the plain adapters, and takes each subject's path
        from its own M-MIVA's prediction (`predict_composite`); "attention" mixes them in one pass
        (eq. S4-S6), M-MIVAs kept off each other's subject paths (`masks.exclusive_regions`).
        """
        base = self.base
        num_frames = base.frames if num_frames is None else num_frames
        height, width = height or base.height, width or base.width
        self._check(num_frames, num_inference_steps, guidance_scale, height, width, shared_noise_ratio, dct_cutoff,
                    dct_timestep)
        attached = self.adapters
        adapters = {name: 1.0 for name in attached} if adapters is None else dict(adapters)
        for name, weight in adapters.items():
            if name not in attached:
                raise ValueError(f"adapter '{name}' is not loaded; loaded: {', '.join(attached) or 'none'}.")
            check_weight(name, weight)
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(
                int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            )

        if mix not in MIX_MODES:
            raise ValueError(f"mix is {mix!r}; use one of {', '.join(MIX_MODES)}.")
        masks = masks or {}
        masked = [name for name, w in adapters.items() if w != 0 and attached[name].masked]
        composite = mix == "composite" and bool(masked) and sum(w != 0 for w in adapters.values()) > 1
        fitted = self.fitted_masks(adapters, masks, num_frames, height, width) if masks else {}
        first = self.encode(self.prepare_first_frame(image, height, width))  # (1, c, h, w)
        scheduler = type(base.scheduler).from_config(base.scheduler.config)  # fresh per call
        scheduler.set_timesteps(num_inference_steps, device=base.device)
        step_kwargs = step_arguments(scheduler, generator)
        dct_init = base.dct_init if dct_init is None else dct_init
        init = dict(shared_noise_ratio=shared_noise_ratio, dct_init=dct_init, dct_cutoff=dct_cutoff,
                    dct_timestep=dct_timestep)
        latents = self.initial_latents(first, base.latent_frames(num_frames), scheduler, generator, **init).to(base.device)
        streams = (MaskStreams.start(self, masked, fitted, first, num_frames, scheduler, generator, num_inference_steps,
                                     mask_steps, mask_tolerance, init) if masked else None)
        manager = adapters_of(base.unet)
        with contextlib.ExitStack() as stack:
            call = stack.enter_context(manager.call(weights=adapters)) if manager is not None else None
            regions = self._confine(call, adapters, fitted, masked, latents, streams, exclusive=not composite)
            if call is not None and streams is None and guidance_scale == 1:  # every pass alike: fold the LoRA in
                stack.enter_context(manager.merged_lora())
            owners = composite_owners(base, masked, fitted, latents) if composite else None  # renewed with the masks
            for i, t in enumerate(scheduler.timesteps):
                latents = self.hold_first_frame(latents, first)
                model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
                due = streams is not None and streams.due(i)
                if due:
                    streams.latents[:, :, 0] = streams.firsts
                if composite:
                    prediction, mask_prediction = self.predict_composite(model_input, first, t, adapters, guidance_scale,
                                                                         streams, owners, due, call)
                elif due:
                    prediction, mask_prediction = self.predict(model_input, first, t, adapters, guidance_scale, streams,
                                                               call)
                else:
                    prediction = self.predict(model_input, first, t, adapters, guidance_scale, call=call)
                if due:
                    streams.update(base, mask_prediction, scheduler.timesteps, i)
                    fitted.update(zip(streams.names, streams.pixels.to(torch.float32).cpu()))
                    regions = self._confine(call, adapters, fitted, masked, latents, streams, exclusive=not composite)
                    owners = composite_owners(base, masked, fitted, latents) if composite else None
                latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
                if callback is not None:
                    callback(i + 1, len(scheduler.timesteps))
        latents = self.hold_first_frame(latents, first)
        if adain:
            latents = schedules.adain(latents)  # once, after the last step (B.3.2)
        subject_masks = None if streams is None else dict(zip(streams.names, streams.pixels))
        return MivaOutput(frames=self.decode(latents), fps=fps, latents=latents, regions=regions,
                          subject_masks=subject_masks, mask_passes=0 if streams is None else streams.passes)

    @staticmethod
    def _region_index(adapters: dict[str, float], masks: dict) -> dict[str, int]:
        """Each adapter's index in the unified mask: its place among the masked (1-based), 0 if unmasked."""
        order = [name for name in adapters if name in masks]
        return {name: order.index(name) + 1 if name in masks else 0 for name in adapters}

    def fitted_masks(self, adapters: dict[str, float], masks: dict, num_frames: int | None = None,
                     height: int | None = None, width: int | None = None) -> dict[str, torch.Tensor]:
        """Each mask of a call fitted like the first frame: {name: (F, H, W)}, in the order of `adapters`."""
        for name in masks:
            if name not in adapters:
                raise ValueError(f"a mask was given for '{name}', which is not in this call; "
                                 f"give masks only for the adapters used: {', '.join(adapters) or 'none'}.")
        base = self.base
        num_frames, height, width = num_frames or base.frames, height or base.height, width or base.width
        return {name: masks_lib.fit_mask(masks[name], num_frames, height, width, name) for name in adapters if name in masks}

    def unified_regions(self, adapters: dict[str, float], masks: dict, num_frames: int | None = None,
                        height: int | None = None, width: int | None = None) -> torch.Tensor | None:
        """The unified mask (F, H, W) of a call (eq. S5), at the output size; None without masks.

        Index j >= 1 is the j-th masked adapter in the order of `adapters`, 0 the background.
        """
        if not masks:
            return None
        return masks_lib.unify_masks(list(self.fitted_masks(adapters, masks, num_frames, height, width).values()))

    def _confine(self, call, adapters: dict[str, float], fitted: dict[str, torch.Tensor], masked: list[str],
                 latents: torch.Tensor, streams: MaskStreams | None, exclusive: bool = True) -> torch.Tensor | None:
        """Set the call's regions and subject masks: the plain adapters confined to their part of the
        unified mask of `fitted` (eq. S5; an M-MIVA's entry is its current subject masks, so the
        background follows a moving subject) and, if `exclusive`, M-MIVAs mixed with other M-MIVAs to
        all but the others' subjects (`masks.exclusive_regions`); returns S* (None without masks)."""
        if call is None or not fitted:
            return None
        unified = masks_lib.unify_masks(list(fitted.values()))
        grid = latents.shape[-2:]
        regions = {name: (unified == j).float() for name, j in self._region_index(adapters, fitted).items()
                   if name not in masked}
        mixed = masked if exclusive and len(masked) > 1 else []
        regions.update(zip(mixed, masks_lib.exclusive_regions([fitted[name] for name in mixed])))
        call.set(regions={name: masks_lib.to_latent_grid(self.base.latent_regions(r), *grid)[None].to(latents)
                          for name, r in regions.items()}, exclusive=mixed,
                 subjects=streams.context_subjects() if streams is not None else {})
        return unified


def step_arguments(scheduler, generator: torch.Generator) -> dict:
    """`generator` for `scheduler.step` where it takes one (DDIM, Euler), nothing where not (UniPC)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
