"""M-MIVA on Wan2.1 (§3.4 on the DiT): the mask stream's count on the 1.3B config, its twins, the 3-D
attention bias confining the video, masks per latent frame, sampling, compositing, training and resume."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miva import masks as masks_lib
from miva.adapter import adapters_of, attach, detach
from miva.backends import load_base, meta_unet
from miva.cli import main
from miva.config import WEIGHTS_NAME, MivaConfig
from miva.mask_streams import composite_owners
from miva.pipeline import MivaPipeline
from miva.train import MaskTraining, train_adapter

from conftest import randomize

STEPS = dict(num_frames=9, num_inference_steps=4, seed=0)
FAST = dict(steps=4, checkpoint_every=2, preview_steps=2, lr=1e-3)


def masked(base="tiny-wan"):
    return MivaConfig.for_base(base, masked=True)


@pytest.fixture
def subject():
    mask = np.zeros((32, 32), np.float32)
    mask[:, :16] = 1  # the left half
    return mask


@pytest.fixture
def clips():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8) for _ in range(2)]


def test_the_mask_stream_is_a_full_copy_of_the_miva_on_the_full_config(capsys):
    """Paper B.4.3: on Wan2.1-T2V-1.3B M-MIVA adds 35.5M for the mask stream, the MIVA's own count again."""
    counts = attach(meta_unet("wan2.1-1.3b"), masked(base="wan2.1-1.3b")).parameter_report("default")
    miva = counts["cross_frame_attention"] + counts["implicit_prompt"]
    assert counts["mask_stream"] == miva == 35_489_340
    assert counts["total"] == 2 * 35_489_340
    assert main(["params", "--base", "wan2.1-1.3b", "--masked"]) == 0
    out = capsys.readouterr().out
    assert "M-MIVA mask stream" in out and "35,489,340" in out and out.strip().splitlines()[-1] == "total 70978680"


def test_the_video_and_mask_stream_pairs_start_identical_and_detach_removes_the_twins(wan_base):
    manager = attach(wan_base.unet, masked(), "m")
    attach(wan_base.unet, MivaConfig.for_base("tiny-wan"), "p")
    params = manager.parameters("m")
    pairs = [(k, k.replace(".mask_adapters.", ".adapters.")) for k in params if ".mask_adapters." in k]
    assert {k.split(".processor.")[0].rsplit(".", 1)[1] for k, _ in pairs} == {"attn1", "attn2"}  # CFA and prompt
    assert all(torch.equal(params[a], params[b]) and params[a].data_ptr() != params[b].data_ptr() for a, b in pairs)
    detach(wan_base.unet, "m")
    assert not any(".mask_adapters." in n for n, _ in wan_base.unet.named_parameters())


def test_a_latent_frames_subject_is_the_union_of_its_frames(wan_base):
    masks = torch.zeros(9, 8, 8)
    masks[0, 0, 0] = 1
    masks[2, 1, 1] = 1  # frames 1-4 are latent frame 1
    masks[8, 2, 2] = 0.5  # frames 5-8 are latent frame 2
    latent = wan_base.latent_subjects(masks)
    assert latent.shape == (3, 8, 8) and torch.equal(latent[0], masks[0])
    assert latent[1, 1, 1] == 1 and latent[1].sum() == 1 and latent[2, 2, 2] == 0.5 and latent[2].sum() == 0.5


def forward(base, sample, seed=0):
    with torch.no_grad():
        return base.denoise(sample, torch.tensor(700.0), base.null_prompt_embeds)


def test_a_subject_mask_confines_the_video_attention_across_all_latent_frames(wan_base):
    """With an M-MIVA's subject on the top half, the background tokens' prediction does not depend on
    the subject tokens' latents (eq. 3 between all f n tokens, CFA included), in any latent frame;
    without the subject mask it does."""
    manager = attach(wan_base.unet, masked(), "m")
    randomize(manager.parameters("m"), scale=0.2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 16, 3, 8, 8, generator=g)  # 3 latent frames of 4x4 patch tokens
    changed = sample.clone()
    changed[..., :4, :] += torch.randn(1, 16, 3, 4, 8, generator=g)  # the subject's latents, every frame
    subject = torch.zeros(1, 3, 8, 8)
    subject[..., :4, :] = 1
    with manager.call(subjects={"m": subject}):
        a, b = forward(wan_base, sample), forward(wan_base, changed)
        assert manager.context.joint_bias(16).shape == (1, 1, 48, 48)
    assert (a[..., 4:, :] - b[..., 4:, :]).abs().max() < 1e-4  # the background
    assert (a[..., :4, :] - b[..., :4, :]).abs().max() > 1e-2
    free_a, free_b = forward(wan_base, sample), forward(wan_base, changed)
    assert (free_a[..., 4:, :] - free_b[..., 4:, :]).abs().max() > 1e-2


def test_a_mask_clip_meets_only_its_own_twins(wan_base):
    """In a joint pass (the video, then m's mask clip) the mask clip's prediction moves with m's
    mask-stream twins and not with the video's adapters, and the video's is the one it has alone."""
    manager = attach(wan_base.unet, masked(), "m")
    params = manager.parameters("m")
    video = {k: p for k, p in params.items() if ".mask_adapters." not in k}
    twins = {k: p for k, p in params.items() if ".mask_adapters." in k}
    g = torch.Generator().manual_seed(0)
    joint = torch.randn(2, 16, 3, 4, 4, generator=g)
    subject = torch.zeros(1, 3, 4, 4)
    subject[..., :2] = 1
    with manager.call(subjects={"m": subject}, streams=(None, "m")) as call:
        before = forward(wan_base, joint)
        randomize(video, seed=1, scale=0.2)
        moved = forward(wan_base, joint)
        assert torch.allclose(moved[1], before[1], atol=1e-6) and not torch.allclose(moved[0], before[0], atol=1e-4)
        randomize(twins, seed=2, scale=0.2)
        both = forward(wan_base, joint)
        assert torch.allclose(both[0], moved[0], atol=1e-5) and not torch.allclose(both[1], moved[1], atol=1e-4)
        call.set(streams=(None,))
        assert torch.allclose(forward(wan_base, joint[:1])[0], both[0], atol=1e-5)


def test_sampling_with_a_subject_mask_and_without(wan_pipe, first_frame, subject):
    manager = attach(wan_pipe.base.unet, masked(), "m")
    randomize(manager.parameters("m"), scale=0.1)
    seen = []

    def look(step, total):
        context = manager.context
        seen.append((context.subjects["m"].shape, context.joint_bias(4) is not None))

    out = wan_pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, callback=look, **STEPS)
    assert out.frames.shape == (9, 32, 32, 3) and out.mask_passes == len(masks_lib.mask_steps(4))
    masks = out.subject_masks["m"]
    assert masks.shape == (9, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    assert torch.equal(masks[0], torch.from_numpy(subject))  # frame 0 is the given mask
    assert seen[0] == (torch.Size([1, 3, 4, 4]), True)  # S per latent frame at the latent grid; the video biased
    assert manager.context.subjects == {} and manager.context.streams == (None,)
    with pytest.raises(ValueError, match="M-MIVA 'm' needs a mask of its subject on the first frame"):
        wan_pipe(first_frame, adapters={"m": 1.0}, **STEPS)
    with pytest.raises(ValueError, match=r"the mask for 'm' has 4 frames; give one mask image or one per frame \(9\)"):
        wan_pipe(first_frame, adapters={"m": 1.0}, masks={"m": np.repeat(subject[None], 4, 0)}, **STEPS)
    assert wan_pipe(first_frame, adapters={"m": 0.0}, **STEPS).subject_masks is None  # off: the base, no stream


def test_the_mask_streams_twins_shape_the_predicted_masks(wan_pipe, first_frame, subject):
    manager = attach(wan_pipe.base.unet, masked(), "m")
    untrained = wan_pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, **STEPS).subject_masks["m"]
    params = manager.parameters("m")
    randomize({k: v for k, v in params.items() if ".attn2.processor.mask_adapters." in k}, scale=0.3)
    prompted = wan_pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, **STEPS).subject_masks["m"]
    assert not torch.allclose(prompted, untrained)  # the twin implicit prompt acts on the mask clip


def test_outside_an_m_mivas_path_a_composite_is_the_plain_adapters_prediction(wan_pipe, first_frame, subject):
    for name, config in (("m", masked()), ("p", MivaConfig.for_base("tiny-wan"))):
        randomize(attach(wan_pipe.base.unet, config, name).parameters(name), seed=len(name) + ord(name), scale=0.2)
    manager = adapters_of(wan_pipe.base.unet)
    g = torch.Generator().manual_seed(0)
    latents, first = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    fitted = {"m": torch.from_numpy(subject)[None].expand(9, -1, -1)}
    owners = composite_owners(wan_pipe.base, ["m"], fitted, latents)
    owner = owners[0].expand_as(latents)
    assert owner.shape == latents.shape and (owner == 0).any() and (owner == 1).any()
    streams = type("Streams", (), {"names": ["m"]})()
    subjects = {"m": masks_lib.to_latent_grid(wan_pipe.base.latent_subjects(fitted["m"]), 4, 4)[None]}
    with manager.call(weights={"m": 1.0, "p": 1.0}, subjects=subjects):
        out, _ = wan_pipe.predict_composite(latents, first, 700, {"m": 1.0, "p": 1.0}, 1.0, streams, owners, due=False)
        alone = {name: wan_pipe.predict(latents, first, 700, {name: 1.0}, 1.0) for name in ("m", "p")}
    assert torch.allclose(out[owner == 0], alone["p"][owner == 0], atol=1e-5)
    assert torch.allclose(out[owner == 1], alone["m"][owner == 1], atol=1e-5)
    assert not torch.allclose(alone["m"], alone["p"], atol=1e-3)


def test_an_m_miva_trains_resumes_and_samples_on_wan(wan_pipe, clips, subject, tmp_path):
    masks = [np.repeat(np.roll(subject, 4 * i, axis=1)[None], 9, 0) for i in range(len(clips))]
    losses = []
    folder = train_adapter(wan_pipe, clips, tmp_path / "a", "pan", masks=masks,
                           callback=lambda step, total, loss, eta: losses.append(loss), **FAST)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    config = MivaConfig.load(folder)
    assert config.masked and (config.base, config.temporal_lora_rank) == ("tiny-wan", 0)
    assert "M-MIVA mask stream" in (folder / "README.md").read_text()
    reference = load_file(folder / WEIGHTS_NAME)

    def crash(step, total, loss, eta):
        if step == 3:
            raise KeyboardInterrupt  # after step 3; the last checkpoint is step 2

    with pytest.raises(KeyboardInterrupt):
        train_adapter(wan_pipe, clips, tmp_path / "b", "pan", masks=masks, callback=crash, **FAST)
    resumed = train_adapter(wan_pipe, clips, tmp_path / "b", "pan", masks=masks, resume=True, **FAST)
    weights = load_file(resumed / WEIGHTS_NAME)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    name = wan_pipe.load_adapter(folder)
    out = wan_pipe(clips[0][0], adapters={name: 1.0}, masks={name: subject}, **STEPS)
    assert out.subject_masks[name].shape == (9, 32, 32)


def test_training_masks_go_to_latent_frames_and_wrong_sizes_are_refused(wan_pipe, clips, subject, tmp_path):
    masks = [np.repeat(subject[None], 9, 0) for _ in clips]
    attach(wan_pipe.base.unet, masked(), "m")
    with adapters_of(wan_pipe.base.unet).call(weights={"m": 1.0}) as call:
        truth = MaskTraining(wan_pipe, call, "m", masks, steps=2).truth
    assert truth.shape == (2, 3, 4, 4) and torch.equal(truth[:, :, :, :2], torch.ones(2, 3, 4, 2))
    detach(wan_pipe.base.unet)
    with pytest.raises(ValueError, match=r"the masks of clip 0 are \(4, 32, 32\) but the clip is \(9, 32, 32\)"):
        train_adapter(wan_pipe, clips, tmp_path / "x", "pan", masks=[m[:4] for m in masks], **FAST)
    with pytest.raises(ValueError, match="one mask sequence per clip"):
        train_adapter(wan_pipe, clips, tmp_path / "x", "pan", masks=masks[:1], **FAST)
    assert not (tmp_path / "x").exists()


def test_an_m_miva_on_wan_can_start_from_a_trained_miva(wan_base, tmp_path):
    """`init`: both twins (CFA and implicit prompt) start as the MIVA's own parts."""
    from miva.adapter_files import save_adapter
    from miva.train import start_from

    manager = attach(wan_base.unet, MivaConfig.for_base("tiny-wan"), "plain")
    randomize(manager.parameters("plain"), seed=1)
    save_adapter(wan_base.unet, "plain", tmp_path / "plain")
    plain = manager.state_dict("plain")
    manager.add(masked(), "m")
    start_from(manager, "m", tmp_path / "plain")
    started = manager.state_dict("m")
    twins = [k for k in started if ".mask_adapters." in k]
    assert any(".attn2." in k for k in twins) and any(".attn1." in k for k in twins)
    assert all(torch.equal(started[k], plain[k.replace(".mask_adapters.", ".adapters.")]) for k in twins)
