"""The toy base's pieces: exact pixel-shuffle VAE, save/export/load, first-frame conditioning."""

import pytest
import torch

from miva.pipeline import MivaPipeline
from miva.toy.base import PixelShuffleVAE, export_checkpoint, load_toy, new_toy, save_toy
import numpy as np

from miva.toy.train_base import Prefetcher, base_batch, base_clips
from miva.train import run_training


def test_pixel_shuffle_vae_is_exact():
    vae = PixelShuffleVAE()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (3, 12, 16, 16) and torch.equal(vae.decode(z).sample, x)


def test_base_batches_are_deterministic():
    a, b = base_batch(5, 2), base_batch(5, 2)
    assert a.shape == (2, 12, 16, 16, 16) and torch.equal(a, b) and not torch.equal(a, base_batch(6, 2))
    assert a.min() >= -1 and a.max() <= 1


def test_prefetching_workers_render_the_same_batches():
    fetch = Prefetcher(batch=2, workers=1, ahead=3)
    try:
        got = [fetch(step) for step in (0, 1, 5)]  # 5: a resumed run skips ahead
    finally:
        fetch.close()
    for step, clips in zip((0, 1, 5), got):
        assert all(np.array_equal(x, y) for x, y in zip(clips, base_clips(step, 2)))


def test_save_load_and_sample(tmp_path):
    unet, prompt = new_toy(seed=3)
    save_toy(unet, prompt, tmp_path / "toy")
    base = load_toy(tmp_path / "toy")
    assert base.concat_first_frame and base.unet.config.in_channels == 24
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), unet.state_dict().values()))
    out = MivaPipeline(base)(torch.rand(3, 32, 32), num_frames=4, num_inference_steps=2, seed=0)
    assert out.frames.shape == (4, 32, 32, 3)
    first = (torch.rand(3, 32, 32) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    frames = MivaPipeline(base)(first, num_frames=3, num_inference_steps=3, seed=0).frames
    # exact VAE, and an untrained base (conv_out = 0) predicts "the first frame" everywhere: a clean copy
    assert all(abs(f.astype(int) - first).max() <= 1 for f in frames)


def test_export_takes_the_ema_weights(tmp_path):
    unet, prompt = new_toy()
    params = {f"unet.{k}": p for k, p in unet.named_parameters()} | {"null_prompt_embeds": prompt}
    run_training(params, lambda step, gen: sum(p.pow(2).sum() for p in params.values()) * 1e-6, 2, tmp_path,
                 checkpoint_every=1, ema=0.5, meta={"what": "toy-base"})
    base = load_toy(export_checkpoint(tmp_path))
    assert base.unet.config.in_channels == 24


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m miva.toy train-base"):
        load_toy(tmp_path)
