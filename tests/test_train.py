"""Few-shot adapter training on the tiny base: exact resume, outputs, bad input."""

import numpy as np
import pytest
import torch
from conftest import randomize, unet_inputs
from safetensors.torch import load_file

from miva.loop import diffusion_loss, encode_clips, step_generator
from miva.train import train_adapter

FAST = dict(steps=6, checkpoint_every=2, preview_steps=2, lr=1e-3)


@pytest.fixture
def clips():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]


def weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_writes_a_complete_adapter(pipe, clips, tmp_path):
    calls = []
    folder = train_adapter(pipe, clips, tmp_path / "spin", "spin", callback=lambda *a: calls.append(a), **FAST)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png", "preview.gif"]
    assert [c[0] for c in calls] == list(range(1, 7)) and all(c[1] == 6 for c in calls)
    card = (folder / "README.md").read_text()
    assert "![preview](preview.gif)" in card and "- clips: 2" in card
    assert pipe.adapters == {}  # the base is left as it was
    assert pipe.load_adapter(folder) == "spin"


def test_interrupted_run_resumes_exactly(pipe, clips, tmp_path):
    reference = weights(train_adapter(pipe, clips, tmp_path / "a", "spin", **FAST))

    def crash(step, total, loss, eta):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3; the last checkpoint is step 2

    with pytest.raises(KeyboardInterrupt):
        train_adapter(pipe, clips, tmp_path / "b", "spin", callback=crash, **FAST)
    assert pipe.adapters == {}
    with pytest.raises(ValueError, match="pass --resume"):
        train_adapter(pipe, clips, tmp_path / "b", "spin", **FAST)
    assert same(weights(train_adapter(pipe, clips, tmp_path / "b", "spin", resume=True, **FAST)), reference)


def test_stop_keeps_finished_steps(pipe, clips, tmp_path):
    reference = weights(train_adapter(pipe, clips, tmp_path / "a", "spin", **FAST))
    done = []
    stopped = train_adapter(pipe, clips, tmp_path / "b", "spin", callback=lambda s, *a: done.append(s),
                            should_stop=lambda: len(done) >= 3, **FAST)
    assert stopped is None and (tmp_path / "b" / "checkpoint" / "state.json").is_file()
    assert same(weights(train_adapter(pipe, clips, tmp_path / "b", "spin", resume=True, **FAST)), reference)


def test_resume_of_another_run_is_refused(pipe, clips, tmp_path):
    train_adapter(pipe, clips, tmp_path / "a", "spin", should_stop=lambda: False, callback=None,
                  **{**FAST, "steps": 2})
    with pytest.raises(ValueError, match="already holds a finished adapter"):
        train_adapter(pipe, clips, tmp_path / "a", "spin", **FAST)
    stop = iter([False, False, True])
    train_adapter(pipe, clips, tmp_path / "b", "spin", should_stop=lambda: next(stop), **FAST)
    with pytest.raises(ValueError, match="from a different run"):
        train_adapter(pipe, clips, tmp_path / "b", "spin", resume=True, seed=5, **FAST)


def test_training_lowers_the_loss_on_a_fixed_batch(pipe, clips, tmp_path):
    from miva.adapter import attach
    from miva.config import MivaConfig

    latents = encode_clips(pipe.encode, clips[:1])
    timesteps = torch.tensor([700])

    def fixed_loss():
        return diffusion_loss(pipe.base, latents, step_generator(9, 0), timesteps=timesteps)

    manager = attach(pipe.base.unet, MivaConfig(base="tiny"), "a")
    manager.set_trainable("a")
    params = list(manager.parameters("a").values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = float(fixed_loss())
    for _ in range(15):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert float(fixed_loss()) < 0.9 * before


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_checkpointing_recomputes_the_motion_modules_with_the_same_gradients(tiny_base, masked):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    from miva.adapter import attach
    from miva.backends.base import set_gradient_checkpointing
    from miva.config import MivaConfig

    unet = tiny_base.unet
    manager = attach(unet, MivaConfig(base="tiny", masked=masked), "a")
    manager.set_trainable("a")
    params = manager.parameters("a")
    randomize(params)
    sample, timestep, embeds = unet_inputs(tiny_base)
    state = {}
    if masked:  # an M-MIVA's batch: the video clip, then its mask clip, the subject biasing the attention
        sample, embeds = torch.cat([sample, sample.flip(1)]), torch.cat([embeds, embeds])
        state = {"streams": (None, "a"), "subjects": {"a": torch.rand(1, *sample.shape[2:])}}
    motion = [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    runs = []
    motion[0].transformer_blocks[0].register_forward_hook(lambda *_: runs.append(1))

    def grads():
        runs.clear()
        for p in params.values():
            p.grad = None
        with manager.call(weights={"a": 1.0}, **state):
            unet(sample, timestep, encoder_hidden_states=embeds).sample.square().mean().backward()
        return {k: p.grad.clone() for k, p in params.items()}, len(runs)

    plain, plain_runs = grads()
    set_gradient_checkpointing(unet, True)
    checkpointed, checkpointed_runs = grads()
    set_gradient_checkpointing(unet, False)
    assert (plain_runs, checkpointed_runs) == (1, 2)
    assert not any("forward" in vars(m) for m in motion)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)



def test_an_interrupted_checkpointed_run_turns_checkpointing_off_again(pipe, clips, tmp_path):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    def crash(step, total, loss, eta):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(pipe, clips, tmp_path / "a", "spin", callback=crash, gradient_checkpointing=True, **FAST)
    unet = pipe.base.unet
    assert not unet.is_gradient_checkpointing
    assert not any("forward" in vars(m) for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D))

def test_bad_training_input(pipe, clips, tmp_path):
    with pytest.raises(ValueError, match="no clips"):
        train_adapter(pipe, [], tmp_path / "x", "spin", **FAST)
    with pytest.raises(ValueError, match="at least 1"):
        train_adapter(pipe, clips, tmp_path / "x", "spin", **{**FAST, "steps": 0})
    with pytest.raises(ValueError, match="not allowed"):
        train_adapter(pipe, clips, tmp_path / "x", "spin", name="../evil", **FAST)


def test_colour_variants_permute_channels_and_keep_everything_else():
    from miva.train import colour_variants

    clip = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    variants = colour_variants([clip, clip[::-1]], 3)
    assert len(variants) == 6 and np.array_equal(variants[0], clip) and np.array_equal(variants[1], clip[..., [1, 2, 0]])
    assert all(np.array_equal(np.sort(v, axis=-1), np.sort(clip, axis=-1)) for v in variants[:3])
    with pytest.raises(ValueError, match="augment must be 1 to 6"):
        colour_variants([clip], 7)


def test_float16_loss_scaling_keeps_gradients_below_float16s_range_and_resumes_its_scale(tmp_path):
    from miva.loop import run_training

    def run(folder, loss_scaling, callback=None, resume=False):
        w = torch.nn.Parameter(torch.ones(1024))

        def loss(step, generator):  # d loss / d w = 1e-9 (float16 flushes it to 0); scaled, step 0's overflows
            return (w.half() * 1e-3 * 1e-3).float().mean() * (1e5 if step == 0 and loss_scaling else 1.0)

        state = run_training({"w": w}, loss, 4, folder, lr=1e-2, checkpoint_every=2, resume=resume,
                             callback=callback, loss_scaling=loss_scaling)
        return w.detach(), state

    unscaled, _ = run(tmp_path / "plain", False)
    assert torch.equal(unscaled, torch.ones(1024))  # every gradient underflowed
    straight, state = run(tmp_path / "scaled", True)
    assert (straight < 1).all()
    assert state.grad_scaler["scale"] == 2.0**15 and state.grad_scaler["_growth_tracker"] == 3  # step 0 skipped

    def crash(step, total, loss, eta):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", True, callback=crash)
    resumed, state = run(tmp_path / "resumed", True, resume=True)
    assert torch.equal(resumed, straight) and state.grad_scaler == run(tmp_path / "again", True)[1].grad_scaler
