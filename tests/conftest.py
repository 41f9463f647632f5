"""Shared fixtures: tiny bases of the real classes, built in code (diffusers' get_dummy_components style)."""

import numpy as np
import pytest
import torch

from miva.backends import load_base
from miva.pipeline import MivaPipeline


@pytest.fixture
def tiny_base():
    return load_base("tiny")


@pytest.fixture
def pipe(tiny_base):
    return MivaPipeline(tiny_base)


@pytest.fixture
def first_frame():
    rng = np.random.default_rng(0)
    return (rng.random((32, 32, 3)) * 255).astype(np.uint8)


def unet_inputs(base, frames=4, seed=0, timestep=500):
    """(sample, timestep, encoder_hidden_states) for one clip of `frames` latent frames."""
    g = torch.Generator().manual_seed(seed)
    c = base.unet.config.in_channels
    size = base.height // base.vae_scale_factor
    sample = torch.randn(1, c, frames, size, size, generator=g)
    return sample, torch.tensor(timestep), base.null_prompt_embeds.expand(frames, -1, -1)


def randomize(params, seed=1, scale=0.05):
    """Give an adapter non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
