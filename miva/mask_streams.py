"""M-MIVA's mask streams at sampling time (§3.4): the mask clips that run with the video, their one-step
mask prediction (§3.4.2) and mask-step cache (B.1.3), and where each M-MIVA draws in a composited mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import masks as masks_lib


@dataclass
class MaskStreams:
    """The mask clips of the M-MIVAs in one call (§3.4) and their mask-step cache (B.1.3).

    Mask latents are denoised only at the steps in `steps`; between two of them they are moved by one
    deterministic DDIM jump (x_0 and ε from the one-step prediction, re-noised to the next mask step),
    and the subject masks S^(j) that bias the video's attention are reused from the last prediction.
    """

    names: list[str]
    latents: torch.Tensor  # (n, c, f, h, w) noisy mask latents at the next mask step
    firsts: torch.Tensor  # (n, c, h, w) clean first-frame mask latents (kept at every step)
    subjects: torch.Tensor  # (n, f, h, w) S^(j) at the latent grid: a prior, then the last prediction
    first_pixels: torch.Tensor  # (n, H, W) the given first-frame masks
    steps: list[int]  # sampling steps that run the mask streams
    tolerance: float | None = None  # stop once the predicted masks change less than this (mean |ΔS|)
    pixels: torch.Tensor | None = None  # (n, F, H, W) the last predicted masks at the output size
    passes: int = 0

    @classmethod
    def start(cls, pipe, masked: list[str], fitted: dict[str, torch.Tensor], first_latent: torch.Tensor,
              num_frames: int, scheduler, generator, num_inference_steps: int, mask_steps, mask_tolerance,
              init: dict) -> MaskStreams:
        """The M-MIVAs' mask clips: first-frame subject masks from the `fitted` masks of the call, the
        rest initialised like the video (shared noise, DCTInit: "an identical procedure", B.3)."""
        missing = [name for name in masked if name not in fitted]
        if missing:
            raise ValueError(f"M-MIVA '{missing[0]}' needs a mask of its subject on the first frame; "
                             f"give masks={{'{missing[0]}': image}} (in the app: its region or phrase in the Mix tab).")
        steps = schedule(mask_steps, num_inference_steps)
        latent_frames = pipe.base.latent_frames(num_frames)
        first_masks = torch.stack([fitted[name][0] for name in masked])
        firsts = pipe.encode((first_masks[:, None] * 2 - 1).expand(-1, 3, -1, -1))  # (n, c, h, w)
        latents = torch.cat([pipe.initial_latents(firsts[k : k + 1], latent_frames, scheduler, generator, **init)
                             for k in range(len(masked))]).to(firsts)
        prior = masks_lib.to_latent_grid(first_masks, *first_latent.shape[-2:])[:, None].expand(-1, latent_frames, -1, -1)
        return cls(list(masked), latents, firsts, prior.to(first_latent).clone(), first_masks, steps, mask_tolerance)

    def due(self, step: int) -> bool:
        return step in self.steps

    def one(self, k: int) -> MaskStreams:
        """The stream of the k-th M-MIVA alone (a composited mix runs each M-MIVA in its own pass)."""
        return MaskStreams([self.names[k]], self.latents[k : k + 1], self.firsts[k : k + 1],
                           self.subjects[k : k + 1], self.first_pixels[k : k + 1], self.steps, self.tolerance)

    def context_subjects(self) -> dict[str, torch.Tensor]:
        return {name: self.subjects[k : k + 1] for k, name in enumerate(self.names)}

    def update(self, base, prediction: torch.Tensor, timesteps, step: int) -> None:
        """One-step prediction of the masks (§3.4.2): x_0 of each mask clip decoded through the VAE becomes
        S^(j); the mask latents jump to the next mask step (or stop there when none is left)."""
        t, sample = timesteps[step], self.latents
        x0 = base.predicted_sample(prediction, sample, t)
        x0[:, :, 0] = self.firsts
        pixels = torch.stack([decode_masks(base, x0[k : k + 1]) for k in range(len(self.names))])  # (n, F, H, W)
        pixels[:, 0] = self.first_pixels.to(pixels)
        change = None if self.pixels is None else float((pixels - self.pixels).abs().mean())
        self.pixels = pixels
        subjects = masks_lib.to_latent_grid(base.latent_subjects(pixels), *sample.shape[-2:]).to(self.subjects)
        subjects[:, 0] = self.subjects[:, 0]  # frame 0 stays the given mask
        self.subjects = subjects
        self.passes += 1
        later = [i for i in self.steps if i > step]
        if self.tolerance is not None and change is not None and change < self.tolerance:
            later = []  # the masks have settled: reuse them for the rest of the sampling
        self.steps = [i for i in self.steps if i <= step] + later
        if later:
            signal, noise = (x.to(sample) for x in base.noise_levels(t))
            eps = (sample - signal * x0) / noise
            self.latents = base.add_noise(x0, eps, timesteps[later[0]].reshape(1).to(sample.device))


def schedule(mask_steps, num_inference_steps: int) -> list[int]:
    """The sampling steps that run the mask streams: `mask_steps` (None: the paper's, scaled, see
    `masks.mask_steps`; "all": every step), which must include step 0."""
    if mask_steps is None:
        mask_steps = masks_lib.mask_steps(num_inference_steps)
    elif isinstance(mask_steps, str):
        if mask_steps != "all":
            raise ValueError(f"mask_steps is {mask_steps!r}; give a list of sampling steps, \"all\" or None.")
        mask_steps = range(num_inference_steps)
    steps = sorted({int(i) for i in mask_steps if 0 <= int(i) < num_inference_steps})
    if 0 not in steps:
        raise ValueError(f"mask_steps {list(mask_steps)} must include step 0, where the mask clips start "
                         f"from noise (steps are 0..{num_inference_steps - 1}).")
    return steps


@torch.no_grad()
def decode_masks(base, latents: torch.Tensor) -> torch.Tensor:
    """(1, c, f, h, w) latents of a mask clip -> (F, H, W) in [0, 1] (channel mean of the decoded frames)."""
    return ((base.decode_video(latents).float().mean(dim=1) + 1) / 2).clamp(0, 1)


def composite_owners(base, names: list[str], fitted: dict[str, torch.Tensor], latents: torch.Tensor) -> list[torch.Tensor]:
    """Where each M-MIVA of a composite draws, (1, 1, f, h, w) weights at the latent grid, in the order
    of `names`: its subject's path (`masks.subject_paths`: where it is and where it was), less the
    paths of the M-MIVAs after it (overlaps go to the later one, as in eq. S5)."""
    owners, covered = [], None
    for name in reversed(names):
        path = masks_lib.subject_paths([fitted[name]])[0]
        path = path if covered is None else path * (1 - covered)
        covered = path if covered is None else covered + path
        owners.append(masks_lib.to_latent_grid(base.latent_regions(path), *latents.shape[-2:]).to(latents)[None, None])
    return owners[::-1]
