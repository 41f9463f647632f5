"""MivaPipeline end to end on the tiny base: sampling, switches, mixing, outputs and bad input."""

import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from miva.adapter import attach
from miva.adapter_files import save_adapter
from miva.config import MivaConfig
from miva.catalogue import resolve_adapter

from conftest import randomize

FAST = dict(num_frames=4, num_inference_steps=2)


def test_output_frames_and_first_frame_kept(pipe, first_frame):
    out = pipe(first_frame, seed=0, **FAST)
    assert out.frames.shape == (4, 32, 32, 3) and out.frames.dtype == np.uint8
    first = pipe.encode(pipe.prepare_first_frame(first_frame, 32, 32))
    assert torch.equal(out.latents[:, :, 0], first)


def test_seeded_calls_are_reproducible_and_independent(pipe, first_frame):
    a = pipe(first_frame, seed=3, **FAST).frames
    pipe(first_frame, seed=4, **FAST)  # a call in between shares no sampling state
    assert np.array_equal(pipe(first_frame, seed=3, **FAST).frames, a)
    assert not np.array_equal(pipe(first_frame, seed=5, **FAST).frames, a)
    g = torch.Generator().manual_seed(3)
    assert np.array_equal(pipe(first_frame, generator=g, **FAST).frames, a)


@pytest.mark.parametrize("frames", [2, 7, 16])
def test_any_frame_count(pipe, first_frame, frames):
    assert pipe(first_frame, seed=0, num_frames=frames, num_inference_steps=1).frames.shape[0] == frames


def test_pre_and_post_processing_are_switchable(pipe, first_frame):
    base = pipe(first_frame, seed=0, **FAST).latents
    for switch in (dict(dct_init=False), dict(adain=False), dict(shared_noise_ratio=0.0)):
        assert not torch.equal(pipe(first_frame, seed=0, **switch, **FAST).latents, base), switch


def test_dct_init_follows_the_base_unless_the_call_says(pipe, first_frame):
    assert pipe.base.dct_init  # the tiny base keeps the paper's default
    on = pipe(first_frame, seed=0, **FAST).latents
    assert torch.equal(pipe(first_frame, seed=0, dct_init=True, **FAST).latents, on)
    pipe.base.dct_init = False
    try:
        assert torch.equal(pipe(first_frame, seed=0, **FAST).latents, pipe(first_frame, seed=0, dct_init=False, **FAST).latents)
        assert torch.equal(pipe(first_frame, seed=0, dct_init=True, **FAST).latents, on)
    finally:
        pipe.base.dct_init = True


def test_adain_matches_frame_statistics(pipe, first_frame):
    latents = pipe(first_frame, seed=0, **FAST).latents
    std = latents.std(dim=(-2, -1))
    assert torch.allclose(std, std[:, :, :1].expand_as(std), rtol=1e-3)


def mixed_pipe(pipe, tmp_path):
    """Two saved adapters with non-zero weights, loaded back through the pipeline."""
    for seed, name in enumerate(["left", "up"], start=1):
        manager = attach(pipe.base.unet, MivaConfig(base="tiny", motion=name), name)
        randomize(manager.parameters(name), seed=seed, scale=0.1)
        save_adapter(pipe.base.unet, name, tmp_path / name)
    pipe.unload_adapter()
    return [pipe.load_adapter(tmp_path / name) for name in ["left", "up"]]


def test_mixing_through_the_pipeline(pipe, first_frame, tmp_path):
    base = pipe(first_frame, seed=0, **FAST).latents
    mixed_pipe(pipe, tmp_path)
    zero = pipe(first_frame, seed=0, adapters={"left": 0, "up": 0}, **FAST).latents
    assert torch.allclose(zero, base, atol=1e-5)
    left = pipe(first_frame, seed=0, adapters={"left": 1}, **FAST).latents
    both = pipe(first_frame, seed=0, adapters={"left": 1, "up": 1}, **FAST).latents
    assert not torch.allclose(left, base, atol=1e-3) and not torch.allclose(both, left, atol=1e-3)
    pipe.unload_adapter("up")
    assert torch.allclose(pipe(first_frame, seed=0, adapters={"left": 1}, **FAST).latents, left, atol=1e-5)


def test_motion_guidance(pipe, first_frame, tmp_path):
    mixed_pipe(pipe, tmp_path)
    adapters = {"left": 1.0}
    one = pipe(first_frame, seed=0, adapters=adapters, **FAST).latents
    assert torch.allclose(pipe(first_frame, seed=0, adapters=adapters, guidance_scale=1.0, **FAST).latents, one)
    assert not torch.allclose(pipe(first_frame, seed=0, adapters=adapters, guidance_scale=2.0, **FAST).latents, one)


def test_videos_are_written(pipe, first_frame, tmp_path):
    out = pipe(first_frame, seed=0, **FAST)
    for name in ("clip.mp4", "clip.gif", "clip.webp"):
        path = out.save(tmp_path / name)
        assert len(imageio.mimread(path)) == 4
    with pytest.raises(ValueError, match="use a file name ending in .mp4"):
        out.save(tmp_path / "clip.avi")


@pytest.mark.parametrize("image", [
    np.zeros((50, 20, 3), np.uint8),  # odd size and aspect: cover-resized and centre-cropped
    np.zeros((40, 40), np.uint8),  # grayscale
    np.zeros((40, 40, 4), np.uint8),  # alpha
    np.zeros((40, 40, 3), np.float32),  # float 0-1
    torch.zeros(3, 40, 40),  # tensor
    Image.new("RGBA", (64, 48)),
])
def test_first_frame_forms(pipe, image):
    assert pipe(image, seed=0, **FAST).frames.shape == (4, 32, 32, 3)


def test_first_frame_from_a_file(pipe, first_frame, tmp_path):
    Image.fromarray(first_frame).save(tmp_path / "f.png")
    assert pipe(tmp_path / "f.png", seed=0, **FAST).frames.shape[0] == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=1), "ask for 2 to 32 frames"),
    (dict(num_frames=33), "ask for 2 to 32 frames"),
    (dict(num_inference_steps=0), "use at least 1 step"),
    (dict(guidance_scale=math.nan), "guidance_scale is nan"),
    (dict(height=30), "multiple of 4"),
    (dict(shared_noise_ratio=-0.1), "shared_noise_ratio"),
    (dict(dct_cutoff=0), "dct_cutoff"),
    (dict(dct_timestep=1000), "dct_timestep"),
    (dict(adapters={"missing": 1.0}), "adapter 'missing' is not loaded"),
])
def test_bad_arguments_say_what_to_change(pipe, first_frame, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(first_frame, seed=0, **{**FAST, **kwargs})


def test_bad_weights_through_the_pipeline(pipe, first_frame, tmp_path):
    mixed_pipe(pipe, tmp_path)
    for weight in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight of adapter 'left'"):
            pipe(first_frame, seed=0, adapters={"left": weight}, **FAST)


@pytest.mark.parametrize("content, message", [(b"", "could not read"), (b"\x89PNG\r\n\x1a\ngarbage", "could not read")])
def test_corrupt_image_file(pipe, tmp_path, content, message):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        pipe(path, **FAST)


def test_missing_image(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe(tmp_path / "none.png", **FAST)
    with pytest.raises(ValueError, match="no first frame"):
        pipe(None, **FAST)


def test_adapter_names_resolve_inside_the_adapters_folder(tmp_path):
    (tmp_path / "zoom").mkdir()
    assert resolve_adapter("zoom", search=(tmp_path,)) == (tmp_path / "zoom").resolve()
    for name in ("../zoom", "..", "/etc", "zoom/../../x"):
        with pytest.raises(FileNotFoundError, match="was not found"):
            resolve_adapter(name, search=(tmp_path / "sub",), allow_paths=False)
    with pytest.raises(FileNotFoundError, match="known adapters: zoom"):
        resolve_adapter("spin", search=(tmp_path,))


@pytest.mark.slow
def test_a_compiled_denoiser_samples_what_the_eager_one_does(pipe, first_frame):
    manager = attach(pipe.base.unet, MivaConfig(base=pipe.base.id), "left")
    randomize(manager.parameters("left"))
    eager = pipe(first_frame, seed=0, **FAST).frames
    pipe.compile()
    compiled, again = (pipe(first_frame, seed=0, **FAST).frames for _ in range(2))
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1 and np.array_equal(compiled, again)
    assert np.array_equal(pipe(first_frame, seed=0, adapters={"left": 0.0}, **FAST).frames,
                          pipe(first_frame, seed=0, adapters={}, **FAST).frames)  # weights change: recompiled, exact
