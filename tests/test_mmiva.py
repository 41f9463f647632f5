"""M-MIVA (§3.4): the mask stream, its attention biases (eq. 3 / S6), one-step mask prediction,
mask-step caching (B.1.3), mask-dropout training (B.1.2) and the exact extra parameter count."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miva import masks as masks_lib
from miva.adapter import adapters_of, attach
from miva.adapter_files import load_adapter
from miva.backends import meta_unet
from miva.cli import main
from miva.config import WEIGHTS_NAME, MivaConfig
from miva.mask_streams import composite_owners
from miva.train import train_adapter

from conftest import randomize

STEPS = dict(num_frames=4, num_inference_steps=10, seed=0)


@pytest.fixture
def subject():
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 4:20] = 1
    return mask


def test_mask_stream_count_on_the_full_config(capsys):
    """Independently parameterised CFA layers per self-attention (§3.4): exactly the CFA's count again."""
    counts = attach(meta_unet("animatediff-v3"), MivaConfig(base="animatediff-v3", masked=True)).parameter_report("default")
    assert counts["mask_stream"] == counts["cross_frame_attention"] == 24_834_272
    assert counts["total"] == 35_444_960 + 24_834_272
    assert main(["params", "--base", "animatediff-v3", "--masked"]) == 0
    out = capsys.readouterr().out
    assert "M-MIVA mask stream" in out and out.strip().splitlines()[-1] == "total 60279232"


def test_the_frame_and_mask_cfa_pair_starts_identical(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", masked=True), "m")
    params = manager.parameters("m")
    pairs = [(k, k.replace(".mask_adapters.", ".adapters.")) for k in params if ".mask_adapters." in k]
    assert pairs and all(torch.equal(params[a], params[b]) for a, b in pairs)
    assert all(params[a].data_ptr() != params[b].data_ptr() for a, b in pairs)  # independent parameters


def test_an_m_miva_needs_its_subject_mask(pipe, first_frame):
    attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m")
    with pytest.raises(ValueError, match="M-MIVA 'm' needs a mask of its subject on the first frame"):
        pipe(first_frame, adapters={"m": 1.0}, **STEPS)


def test_mask_step_cache_and_tolerance(pipe, first_frame, subject):
    manager = attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m")
    randomize(manager.parameters("m"), scale=0.1)
    every = pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, mask_steps="all", **STEPS)
    cached = pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, **STEPS)
    assert every.mask_passes == 10 and cached.mask_passes == len(masks_lib.mask_steps(10)) == 8
    settled = pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, mask_tolerance=1.0, **STEPS)
    assert settled.mask_passes == 2  # the second prediction changed less than the tolerance
    for out in (every, cached, settled):
        masks = out.subject_masks["m"]
        assert masks.shape == (4, 32, 32) and 0 <= masks.min() and masks.max() <= 1
        assert torch.equal(masks[0], torch.from_numpy(subject))  # frame 0 is the given mask
    with pytest.raises(ValueError, match="must include step 0"):
        pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, mask_steps=[50], **STEPS)


def test_the_video_attention_is_biased_by_the_subject_masks(tiny_base):
    """Eq. 3 for one M-MIVA; eq. S6 on the unified mask when an unmasked MIVA joins, which then
    attends within the background 1(S* = 0) (B.2.1)."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", masked=True), "m")
    attach(tiny_base.unet, MivaConfig(base="tiny"), "plain")
    subject = torch.zeros(1, 3, 4, 4)
    subject[:, :, :2] = 1  # top half, all 3 frames
    context = manager.context
    with manager.call(weights={"m": 1.0}, subjects={"m": subject}) as call:
        flat = subject.flatten(2)  # (1, 3, 16)
        assert torch.allclose(context.self_bias(16)[:, 0], masks_lib.mask_bias(flat, flat).flatten(0, 1))
        call.set(weights={"m": 1.0, "plain": 1.0})
        bias = context.self_bias(16)
        assert bias[0, 0, 0, 1] == pytest.approx(0, abs=1e-5) and bias[0, 0, 0, 15] == pytest.approx(np.log(masks_lib.EPS))  # top vs bottom
        background = context.cross_bias("plain", 16)  # (b F, 1, n, 2n): bottom tokens attend to the bottom
        assert background.shape == (3, 1, 16, 32) and background[0, 0, 15, 15] == pytest.approx(0, abs=1e-5)
        assert background[0, 0, 15, 0] == pytest.approx(np.log(masks_lib.EPS))
        call.set(weights={"plain": 1.0})  # no M-MIVA active: nothing is biased
        assert context.self_bias(16) is None and context.cross_bias("plain", 16) is None


def test_the_temporal_attention_is_biased_between_a_pixels_frames(tiny_base):
    """The t-SA bias (B.2.1): eq. 3 between frames of one pixel; only the video stream's rows."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", masked=True), "m")
    name = next(n for n in manager._processors if ".motion_modules." in n)
    attn, processor = tiny_base.unet.get_submodule(name), manager._processors[name]
    assert attn.processor is processor
    subject = torch.zeros(1, 3, 4, 4)
    subject[:, 0, :2] = 1  # the top half is the subject in frame 0 only
    context = manager.context
    with manager.call(subjects={"m": subject}, streams=(None, "m")) as call:
        bias = context.temporal_bias(16, 16)  # (b h w, 1, F, F)
        assert bias.shape == (16, 1, 3, 3)
        assert torch.equal(context.temporal_bias(16, 32)[16:], torch.zeros(16, 1, 3, 3))  # the mask clip's rows
        assert bias[0, 0, 0, 1] == pytest.approx(np.log(masks_lib.EPS)) and bias[0, 0, 1, 2] == pytest.approx(0, abs=1e-5)
        assert torch.allclose(bias[15, 0], torch.zeros(3, 3), atol=1e-5)  # bottom: background in every frame
        hidden = torch.randn(32, 3, attn.to_q.in_features)  # rows: the video's 16 pixels, then the mask clip's
        out = processor(attn, hidden)
        stock = processor.stock(attn, hidden)
        assert torch.allclose(out[16:], stock[16:], atol=1e-6)  # the mask clip is not biased
        assert not torch.allclose(out[:16], stock[:16], atol=1e-4)
        call.set(subjects={})
        assert torch.equal(processor(attn, hidden), stock)  # no M-MIVA: the stock attention


def test_the_mask_streams_own_cfa_shapes_the_predicted_masks(pipe, first_frame, subject):
    """Training only the mask-stream CFA (the video's stays untrained) changes the predicted masks."""
    manager = attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m")
    untrained = pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, **STEPS)
    params = manager.parameters("m")
    randomize({k: v for k, v in params.items() if ".mask_adapters." in k}, scale=0.3)
    trained_masks = pipe(first_frame, adapters={"m": 1.0}, masks={"m": subject}, **STEPS)
    assert not torch.allclose(trained_masks.subject_masks["m"], untrained.subject_masks["m"])


def test_mmiva_training_writes_an_adapter_that_samples(pipe, tmp_path, subject):
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.repeat(subject[None], 4, 0) for _ in clips]
    folder = train_adapter(pipe, clips, tmp_path / "m", "spin", steps=4, checkpoint_every=2, preview_steps=2, lr=1e-3,
                           masks=masks)
    assert MivaConfig.load(folder).masked
    assert "M-MIVA mask stream" in (folder / "README.md").read_text()
    name = load_adapter(pipe.base.unet, folder, base="tiny")
    out = pipe(first_frame_of(clips), adapters={name: 1.0}, masks={name: subject}, **STEPS)
    assert out.mask_passes == 8
    with pytest.raises(ValueError, match="one mask sequence per clip"):
        train_adapter(pipe, clips, tmp_path / "x", "spin", steps=2, masks=masks[:1])
    with pytest.raises(ValueError, match="mask_loss_weight must be above 0, not -1"):
        train_adapter(pipe, clips, tmp_path / "x", "spin", steps=2, masks=masks, mask_loss_weight=-1)
    with pytest.raises(ValueError, match=r"weighs an M-MIVA's mask clips; give masks, or leave it at 1"):
        train_adapter(pipe, clips, tmp_path / "x", "spin", steps=2, mask_loss_weight=0.1)
    assert not (tmp_path / "x").exists()


def test_an_m_miva_step_split_in_micro_batches_is_the_whole_batchs_step(pipe, tmp_path, subject):
    """Each part keeps its clips' own mask clips and the whole batch's draws (ground truth or predicted masks)."""
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.repeat(np.roll(subject, 4 * i, axis=1)[None], 4, 0) for i in range(2)]
    run = dict(steps=3, checkpoint_every=3, preview_steps=1, lr=1e-3, batch=2, masks=masks)
    whole, parts = (load_file(train_adapter(pipe, clips, tmp_path / d, "spin", accumulate=n, **run) / WEIGHTS_NAME)
                    for d, n in (("whole", 1), ("parts", 2)))
    # Summing two half-batch losses rounds differently from one mean; after three Adam steps of 1e-3
    # that is ~1e-5, a hundredth of one step.
    assert all(torch.allclose(whole[k], parts[k], atol=1e-4) for k in whole)


def test_clip_weights_make_a_weighted_mean_of_the_clips_losses(tiny_base):
    from miva.loop import diffusion_loss

    latents = torch.randn(2, 4, 3, 4, 4)

    def loss(weights=None):  # the same noise and timesteps every time
        return float(diffusion_loss(tiny_base, latents, torch.Generator().manual_seed(0), timesteps=torch.tensor([300, 700]),
                                    clip_weights=None if weights is None else torch.tensor(weights)))

    first, second = loss([1.0, 0.0]), loss([0.0, 1.0])
    assert first != pytest.approx(second)
    assert loss() == pytest.approx((first + second) / 2) == pytest.approx(loss([3.0, 3.0]))
    assert loss([1.0, 0.1]) == pytest.approx((first + 0.1 * second) / 1.1)


def first_frame_of(clips):
    return clips[0][0]


def test_an_m_miva_can_start_from_a_trained_miva(tiny_base, tmp_path):
    """`init`: the MIVA's parts are copied, and the mask stream's twin CFA starts as the video's CFA."""
    from miva.adapter_files import save_adapter
    from miva.train import start_from

    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "plain")
    randomize(manager.parameters("plain"), seed=1)
    save_adapter(tiny_base.unet, "plain", tmp_path / "plain")
    plain = manager.state_dict("plain")
    manager.add(MivaConfig(base="tiny", masked=True), "m")
    start_from(manager, "m", tmp_path / "plain")
    started = manager.state_dict("m")
    assert set(plain) < set(started) and all(torch.equal(started[k], plain[k]) for k in plain)
    twins = [k for k in started if ".mask_adapters." in k]
    assert twins and all(torch.equal(started[k], plain[k.replace(".mask_adapters.", ".adapters.")]) for k in twins)
    config = (tmp_path / "plain" / "adapter_config.json")
    config.write_text(config.read_text().replace('"tiny"', '"toy-v4"'))
    with pytest.raises(ValueError, match="made for base 'toy-v4' but this run trains on 'tiny'; start from an adapter of the same base"):
        start_from(manager, "m", tmp_path / "plain")


def test_clips_with_masks_beside_them_train_an_m_miva_from_the_cli(tmp_path, capsys):
    from miva.data import load_clips
    from miva.media import save_video
    from miva.toy.world import WorldConfig, make_clip

    clips = tmp_path / "clips"
    for seed in range(3):
        clip = make_clip("move-left", seed, WorldConfig(size=32, frames=4))
        save_video(clip.frames, clips / f"c{seed}.mp4")
        if seed < 2:  # c2 has no masks
            save_video(np.repeat(clip.masks[:, 0, :, :, None] * np.uint8(255), 3, -1), clips / f"c{seed}.mask.gif")
    with pytest.warns(UserWarning, match="'c2.mp4' has no subject masks beside it; add 'c2.mask.mp4'"):
        loaded = load_clips(clips, frames=4, masks=True)
    assert loaded.names == ["c0.mp4", "c1.mp4"] and len(loaded.masks) == 2  # the .mask files are not clips
    truth = make_clip("move-left", 0, WorldConfig(size=32, frames=4)).masks[:, 0]
    assert loaded.masks[0].shape == (4, 32, 32) and np.array_equal(loaded.masks[0] > 0.5, truth)
    plain, out = tmp_path / "slide", tmp_path / "slide-masked"
    assert main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(plain), "--frames", "4", "--steps", "1"]) == 0
    code = main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(out), "--frames", "4", "--steps", "2",
                 "--checkpoint-every", "1", "--masked", "--mask-loss-weight", "0.1", "--init", str(plain)])
    assert code == 0 and MivaConfig.load(out).masked and MivaConfig.load(out).training["mask_loss_weight"] == 0.1
    assert MivaConfig.load(out).training["init"] == "slide" and "- init: slide" in (out / "README.md").read_text()
    assert main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(tmp_path / "q"), "--masked",
                 "--init", "no-such-adapter"]) == 2
    assert "adapter 'no-such-adapter' was not found" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert main(["train", "--base", "tiny", "--stills", str(clips), "--camera", "zoom-in", "--out",
                 str(tmp_path / "o"), "--masked"]) == 2
    assert "use --clips, not --stills" in capsys.readouterr().err
    assert main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(tmp_path / "p"),
                 "--mask-loss-weight", "0.1"]) == 2  # a plain MIVA has no mask clips to weigh
    assert "add --masked (or --mask-text), or leave it out" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_subject_masks_from_a_phrase_need_the_models(tmp_path, capsys, monkeypatch):
    """`train --mask-text PHRASE` segments each clip (Grounding DINO + SAM 2); offline it says so."""
    import huggingface_hub

    from miva.media import save_video
    from miva.toy.world import WorldConfig, make_clip

    clips = tmp_path / "clips"
    save_video(make_clip("move-left", 0, WorldConfig(size=32, frames=4)).frames, clips / "c0.mp4")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(tmp_path / "o"), "--frames", "4",
                 "--steps", "2", "--mask-text", "the square"]) == 2
    assert "not available offline" in capsys.readouterr().err


def test_joint_passes_weight_each_adapter_on_the_video_and_its_own_mask_clip(tiny_base):
    """In a pass holding the video and M-MIVA m's mask clip, a plain adapter's region applies to the
    video rows (temporal layout (S b h w, F, c) as well as spatial) and it leaves m's mask clip alone."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", masked=True), "m")
    attach(tiny_base.unet, MivaConfig(base="tiny"), "p")
    region = torch.zeros(1, 3, 4, 4)
    region[..., :2] = 1  # left half
    context = manager.context
    with manager.call(regions={"p": region}, streams=(None, "m")):
        out = torch.ones(2 * 16, 3, 1)  # temporal layout: (S b h w, F, c), S = 2
        weighted = context.weighted("p", 0.5, out, temporal=True)
        video = weighted[:16, 0, 0].view(4, 4)
        assert torch.equal(video[:, :2], torch.full((4, 2), 0.5)) and not video[:, 2:].any()
        assert not weighted[16:].any()  # m's mask clip: untouched by p
        assert torch.equal(context.weighted("m", 0.5, out, temporal=True)[16:], torch.full((16, 3, 1), 0.5))
        spatial = torch.ones(2 * 3, 16, 1)  # (S b F, n, c)
        assert torch.equal(context.weighted("p", 1.0, spatial)[:3, :, 0], region.flatten(2)[0])
    assert context.streams == (None,) and not context.regions


def test_a_plain_adapter_in_an_m_miva_mix_acts_on_the_moving_background(pipe, first_frame, subject):
    attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m")
    attach(pipe.base.unet, MivaConfig(base="tiny"), "p")
    out = pipe(first_frame, adapters={"p": 1.0, "m": 1.0}, masks={"m": subject}, **STEPS)
    predicted = out.subject_masks["m"]
    assert torch.equal(out.regions, masks_lib.unify_masks([predicted]))  # S* from the predicted masks, not frame 0


def test_mixed_m_mivas_in_one_pass_each_act_outside_the_others_subject(pipe, first_frame, subject):
    manager = attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m1")
    attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), "m2")
    other = np.zeros((32, 32), np.float32)
    other[8:24, 24:30] = 1
    seen = []

    def look(step, total):  # the regions of the step that just ran
        context = manager.context
        seen.append((set(context.regions), context.exclusive, context.regions.get("m1")))

    pipe(first_frame, adapters={"m1": 1.0, "m2": 1.0}, masks={"m1": subject, "m2": other}, callback=look,
         mix="attention", **STEPS)
    names, exclusive, m1 = seen[0]
    m1 = m1[0, 0]
    assert names == {"m1", "m2"} and exclusive == {"m1", "m2"}
    grid = masks_lib.to_latent_grid(torch.from_numpy(other), *m1.shape)
    assert m1[grid > 0.99].max() == 0 and m1[0, 0] == 1  # m1 stays off m2's subject, acts far from it
    pipe(first_frame, adapters={"m1": 1.0}, masks={"m1": subject}, callback=look, **STEPS)
    assert seen[-1][0] == set() and not seen[-1][1]  # alone, an M-MIVA acts everywhere (eq. 3 steers it)


@pytest.fixture
def two_m_mivas(pipe, subject):
    """m1 on `subject`, m2 on a strip to its right, both with random weights."""
    for name in ("m1", "m2"):
        manager = attach(pipe.base.unet, MivaConfig(base="tiny", masked=True), name)
        randomize(manager.parameters(name), scale=0.1)
    other = np.zeros((32, 32), np.float32)
    other[8:24, 24:30] = 1
    return {"m1": subject, "m2": other}


def test_composited_m_mivas_each_run_as_if_alone(pipe, first_frame, two_m_mivas, monkeypatch):
    """The default mix: one pass per M-MIVA, the only adapter acting in it, with its own mask clip at
    the mask steps and unconfined; one pass for the plain adapters, on the background, with no
    subject biasing it; each subject's mask sequence still comes back."""
    attach(pipe.base.unet, MivaConfig(base="tiny"), "p")
    context = adapters_of(pipe.base.unet).context
    calls, predict = [], pipe.predict

    def spy(latents, first, timestep, adapters, guidance_scale, streams=None, call=None):
        out = predict(latents, first, timestep, adapters, guidance_scale, streams, call)  # the pass's state stays
        calls.append((dict(adapters), None if streams is None else list(streams.names), set(context.regions),
                      context.self_bias(256) is not None))
        return out

    monkeypatch.setattr(pipe, "predict", spy)
    out = pipe(first_frame, adapters={"m1": 1.0, "p": 0.7, "m2": 0.5}, masks=two_m_mivas, **STEPS)
    assert len(calls) == 3 * STEPS["num_inference_steps"]
    assert [c[0] for c in calls[:3]] == [{"m1": 1.0}, {"m2": 0.5}, {"p": 0.7}]
    assert all(regions == {"p"} for _, _, regions, _ in calls)  # p on the background; the M-MIVAs unconfined
    assert [c[3] for c in calls[:3]] == [True, True, False]  # each M-MIVA biased by its subject; p's pass not
    due = masks_lib.mask_steps(10)  # steps 0..7 run the mask clips, 8 and 9 reuse the masks
    assert [c[1] for c in calls[1::3]] == [["m2"] if i in due else None for i in range(10)]
    assert set(out.subject_masks) == {"m1", "m2"} and out.mask_passes == len(due)
    assert out.frames.shape == (4, 32, 32, 3)
    assert context.subjects == {} and context.regions == {}  # nothing left behind for the next call
    with pytest.raises(ValueError, match="use one of composite, attention"):
        pipe(first_frame, adapters={"m1": 1.0, "m2": 1.0}, masks=two_m_mivas, mix="blend", **STEPS)


@pytest.mark.parametrize("plain", [False, True])
def test_each_subject_path_takes_its_own_m_mivas_prediction(pipe, two_m_mivas, monkeypatch, plain):
    """m1's path from m1's pass, m2's (the later one, on top where they meet) from m2's, the rest the
    plain adapters' pass (without one, the M-MIVA passes' mean); motion guidance then applies to the
    composite."""
    value = {"m1": 1.0, "m2": 3.0, "p": 5.0}
    monkeypatch.setattr(pipe, "predict", lambda latents, first, t, adapters, g, streams=None, call=None: torch.full_like(
        latents, value[next(iter(adapters))] if adapters else 0.0))
    fitted = {name: torch.from_numpy(m)[None].expand(4, -1, -1) for name, m in two_m_mivas.items()}
    latents = torch.zeros(1, 4, 4, 16, 16)
    names = ["m1", "m2"]
    streams = type("Streams", (), {"names": names})()
    adapters = {"m1": 1.0, "m2": 1.0, **({"p": 1.0} if plain else {})}
    owners = composite_owners(pipe.base, names, fitted, latents)
    out, masks = pipe.predict_composite(latents, None, 500, adapters, 1.0, streams, owners, due=False)
    assert masks is None
    frame = out[0, 0, 1]  # latent grid 16x16: m1's subject rows 4:12, cols 2:10; m2's cols 12:15
    assert torch.allclose(frame[6, 5], torch.tensor(1.0)) and torch.allclose(frame[6, 13], torch.tensor(3.0))
    assert torch.allclose(frame[0, 0], torch.tensor(5.0 if plain else 2.0))  # the rest
    guided, _ = pipe.predict_composite(latents, None, 500, adapters, 2.0, streams, owners, due=False)
    assert torch.allclose(guided, 2 * out)  # base prediction 0: p = 0 + 2 (composite - 0)
    fitted["m1"] = fitted["m2"]  # the same subject for both: the later M-MIVA draws it
    owners = composite_owners(pipe.base, names, fitted, latents)
    out, _ = pipe.predict_composite(latents, None, 500, adapters, 1.0, streams, owners, due=False)
    assert torch.allclose(out[0, 0, 1, 6, 13], torch.tensor(3.0)) and torch.allclose(out[0, 0, 1, 6, 5], out[0, 0, 1, 0, 0])
