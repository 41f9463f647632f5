"""`MivaPipeline` against diffusers' own `AnimateDiffPipeline` and `WanPipeline` on the same tiny random
components (built as diffusers' tests build theirs), the real repos' scheduler configs, the same initial
noise (the same seeded CPU generator) and step count.

With no adapter and shared noise, DCTInit and AdaIN off, and frame 0 left free (`hold_first_frame`
patched out), our latents equal diffusers' within TOL of their value range; decoded frames agree to
one 8-bit level (ours round to uint8, diffusers' return floats). With the defaults, ours equal
diffusers' loop started from our initial latents with frame 0 replaced by the clean first frame after
every step, then AdaIN: the intended differences and nothing else. Measured on CPU: 0.0 everywhere
(fp32, a bf16 Wan transformer, fp16 AnimateDiff given our prompt embeddings); TOL only leaves room
for other BLAS kernels.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (AnimateDiffPipeline, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)

from miva import schedules
from miva.backends import animatediff, wan
from miva.pipeline import MivaPipeline

from conftest import CONFIGS

TOL = 1e-6  # of the reference latents' value range (max - min)
FRAMES, STEPS, SIZE = {"animatediff": 4, "wan": 9}, 4, 32
PLAIN = dict(shared_noise_ratio=0.0, dct_init=False, adain=False)  # Algorithm 1's pre/post-processing off


def assert_close(ours: torch.Tensor, reference: torch.Tensor):
    ours, reference = ours.float().cpu(), reference.float().cpu()
    assert ours.shape == reference.shape
    scale = float(reference.max() - reference.min())
    error = float((ours - reference).abs().max())
    assert scale > 0 and error <= TOL * scale, f"max |ours - diffusers| = {error:.3g} ({error / scale:.3g} of the range)"


def frames_to_uint8(video: np.ndarray) -> np.ndarray:
    """diffusers' (1, F, H, W, 3) floats in [0, 1] -> (F, H, W, 3) levels."""
    return np.round(video[0] * 255).astype(np.int16)


def free_first_frame(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "hold_first_frame", lambda latents, first: latents)


def hold_first_frame_callback(first):
    """A `callback_on_step_end` that does what our loop does after each step: frame 0 = the clean first frame."""
    def callback(pipeline, step, timestep, tensors):
        tensors["latents"][:, :, 0] = first.to(tensors["latents"])
        return {"latents": tensors["latents"]}
    return callback


# -- AnimateDiff: SD1.5 + motion adapter ------------------------------------------------------------
def sd15_config():
    return json.loads((CONFIGS / "sd15_scheduler.json").read_text())


SCHEDULERS = {  # the reference's schedulers, as diffusers' docs build them from SD1.5's scheduler config
    "ddim": lambda: DDIMScheduler.from_config(sd15_config(), beta_schedule="linear", clip_sample=False,
                                              timestep_spacing="linspace", steps_offset=1),
    "euler": lambda: EulerDiscreteScheduler.from_config(sd15_config()),
}
OURS = {"ddim": None, "euler": SCHEDULERS["euler"]}  # None: the tiny base's own (what `animatediff.load` builds)


def animatediff_pair(kind):
    """Our pipeline on the tiny base and diffusers' on separately built, equal components."""
    base = animatediff.tiny()
    if OURS[kind] is not None:
        base.scheduler = OURS[kind]()
    unet, vae, tokenizer, text_encoder = animatediff.tiny_components()
    reference = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                    motion_adapter=None, scheduler=SCHEDULERS[kind]())
    reference.set_progress_bar_config(disable=True)
    return MivaPipeline(base), reference


def run_animatediff(reference, output_type="latent", **kwargs):
    kwargs = {"prompt": "", **kwargs}
    return reference(num_frames=FRAMES["animatediff"], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type=output_type,
                     **kwargs).frames


def test_animatediff_differs_from_diffusers_only_by_the_first_frame_and_algorithm_1(first_frame):
    pipe, reference = animatediff_pair("ddim")
    ours = pipe(first_frame, num_frames=FRAMES["animatediff"], num_inference_steps=STEPS, seed=0)
    first = pipe.encode(pipe.prepare_first_frame(first_frame, SIZE, SIZE))
    initial = pipe.initial_latents(first, FRAMES["animatediff"], reference.scheduler, torch.Generator().manual_seed(0),
                                   shared_noise_ratio=0.05, dct_init=True, dct_cutoff=0.23, dct_timestep=975)
    assert torch.equal(initial[:, :, 0], first)  # DCTInit starts frame 0 at the clean first frame
    expected = run_animatediff(reference, latents=initial, callback_on_step_end=hold_first_frame_callback(first))
    assert_close(ours.latents, schedules.adain(expected))
    assert torch.equal(ours.latents[:, :, 0], first)
    unconstrained = run_animatediff(reference, latents=initial)
    assert float((unconstrained - expected).abs().max()) > 1e-3  # without the replacement the video drifts


# -- Wan2.1 -------------------------------------------------------------------------------------------
WAN_SCHEDULERS = {  # the reference's: Wan's converter's first scheduler, and the repo's UniPC config
    "flow-euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "unipc": lambda: UniPCMultistepScheduler.from_config(json.loads((CONFIGS / "wan2.1_t2v_1.3b_scheduler.json").read_text())),
}
WAN_OURS = {"flow-euler": None, "unipc": wan.unipc_scheduler}  # None: the tiny Wan's own


def wan_pair(kind, dtype=torch.float32):
    base = wan.tiny(dtype=dtype)
    if WAN_OURS[kind] is not None:
        base.scheduler = WAN_OURS[kind]()
    transformer, vae, tokenizer, text_encoder = wan.tiny_components()
    reference = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae,
                            scheduler=WAN_SCHEDULERS[kind](), transformer=transformer.to(dtype))
    reference.set_progress_bar_config(disable=True)
    return MivaPipeline(base), reference


def run_wan(reference, output_type="latent", **kwargs):
    return reference(prompt="", num_frames=FRAMES["wan"], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=1.0, max_sequence_length=wan.TINY_PROMPT_TOKENS,
                     generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs).frames


PAIRS = {"animatediff": (animatediff_pair, run_animatediff), "wan": (wan_pair, run_wan)}


@pytest.mark.parametrize("name,kind", [("animatediff", k) for k in sorted(SCHEDULERS)]
                         + [("wan", k) for k in sorted(WAN_SCHEDULERS)])
def test_latents_and_frames_match_diffusers(name, kind, first_frame, monkeypatch):
    make_pair, run = PAIRS[name]
    pipe, reference = make_pair(kind)
    free_first_frame(pipe, monkeypatch)
    ours = pipe(first_frame, num_frames=FRAMES[name], num_inference_steps=STEPS, seed=0, **PLAIN)
    assert_close(ours.latents, run(reference))
    levels = np.abs(ours.frames.astype(np.int16) - frames_to_uint8(run(reference, "np")))
    assert levels.max() <= 1


def test_wan_with_a_bf16_transformer_matches_diffusers(first_frame, monkeypatch, tmp_path):
    """The transformer in bf16 as `from_pretrained(torch_dtype=torch.bfloat16)` loads it (its fp32 modules kept),
    fp32 latents and VAE, as Wan's pipeline runs them."""
    pipe, reference = wan_pair("unipc")
    pipe.base = wan.tiny(dtype=torch.bfloat16)
    pipe.base.scheduler = wan.unipc_scheduler()
    reference.transformer.save_pretrained(tmp_path)
    reference.transformer = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in pipe.base.unet.named_parameters()} == \
        {n: p.dtype for n, p in reference.transformer.named_parameters()}
    assert {p.dtype for p in pipe.base.unet.parameters()} == {torch.bfloat16, torch.float32}
    free_first_frame(pipe, monkeypatch)
    ours = pipe(first_frame, num_frames=FRAMES["wan"], num_inference_steps=STEPS, seed=0, **PLAIN)
    assert_close(ours.latents, run_wan(reference))


def test_animatediff_in_fp16_matches_diffusers_given_our_prompt_embeddings(first_frame, monkeypatch):
    """In half precision the one difference is the empty prompt: ours is encoded once in fp32 (the text
    encoder's stored dtype) and then cast, diffusers' by an fp16 text encoder."""
    pipe, reference = animatediff_pair("ddim")
    pipe.base = animatediff.tiny(dtype=torch.float16)
    reference.to(dtype=torch.float16)
    free_first_frame(pipe, monkeypatch)
    ours = pipe(first_frame, num_frames=FRAMES["animatediff"], num_inference_steps=STEPS, seed=0, **PLAIN)
    assert ours.latents.dtype == torch.float16
    assert_close(ours.latents, run_animatediff(reference, prompt_embeds=pipe.base.null_prompt_embeds, prompt=None))


def test_wan_differs_from_diffusers_only_by_the_first_frame_and_algorithm_1(first_frame):
    pipe, reference = wan_pair("flow-euler")
    ours = pipe(first_frame, num_frames=FRAMES["wan"], num_inference_steps=STEPS, seed=0)
    first = pipe.encode(pipe.prepare_first_frame(first_frame, SIZE, SIZE))
    initial = pipe.initial_latents(first, pipe.base.latent_frames(FRAMES["wan"]), reference.scheduler,
                                   torch.Generator().manual_seed(0), shared_noise_ratio=0.05, dct_init=True,
                                   dct_cutoff=0.23, dct_timestep=975)
    expected = run_wan(reference, latents=initial, callback_on_step_end=hold_first_frame_callback(first))
    assert_close(ours.latents, schedules.adain(expected))
    assert torch.equal(ours.latents[:, :, 0], first)
