"""The toy base's pieces: exact pixel-shuffle VAE, save/export/load, first-frame conditioning."""

import dataclasses
import json
import shutil

import pytest
import torch

from miva.pipeline import MivaPipeline
from miva.toy.base import BASE_ID, PixelShuffleVAE, export_checkpoint, load_toy, new_toy, save_toy, toy_parameters
import numpy as np

from miva.toy.train_base import Prefetcher, base_batch, base_clips
from miva.loop import run_training


def test_pixel_shuffle_vae_is_exact():
    vae = PixelShuffleVAE()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (3, 12, 16, 16) and torch.equal(vae.decode(z).sample, x)


def test_base_batches_are_deterministic():
    a, b = base_batch(5, 2), base_batch(5, 2)
    assert a.shape == (2, 12, 16, 16, 16) and torch.equal(a, b) and not torch.equal(a, base_batch(6, 2))
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, base_batch(5, 2, "free"))  # the same motions, placed freely


def test_prefetching_workers_render_the_same_batches():
    fetch = Prefetcher(batch=2, workers=1, ahead=3)
    try:
        got = [fetch(step) for step in (0, 1, 5)]  # 5: a resumed run skips ahead
    finally:
        fetch.close()
    for step, clips in zip((0, 1, 5), got):
        assert all(np.array_equal(x, y) for x, y in zip(clips, base_clips(step, 2)))


def test_save_load_and_sample(tmp_path):
    unet, prompt, text = new_toy(seed=3)
    save_toy(unet, prompt, tmp_path / "toy", text=text)
    base = load_toy(tmp_path / "toy")
    assert base.concat_first_frame and base.unet.config.in_channels == 24 and base.id == BASE_ID
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps(config | {"base": "toy-v1"}))
    assert load_toy(tmp_path / "toy").id == "toy-v1"  # an older export keeps its id, so its adapters still load
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), unet.state_dict().values()))
    out = MivaPipeline(base)(torch.rand(3, 32, 32), num_frames=4, num_inference_steps=2, seed=0)
    assert out.frames.shape == (4, 32, 32, 3)
    first = (torch.rand(3, 32, 32) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    frames = MivaPipeline(base)(first, num_frames=3, num_inference_steps=3, seed=0).frames
    # exact VAE, and an untrained base (conv_out = 0) predicts "the first frame" everywhere: a clean copy
    assert all(abs(f.astype(int) - first).max() <= 1 for f in frames)


def test_export_takes_the_ema_weights(tmp_path):
    params = toy_parameters(*new_toy())
    run_training(params, lambda step, gen: sum(p.pow(2).sum() for p in params.values()) * 1e-6, 2, tmp_path,
                 checkpoint_every=1, ema=0.5, meta={"what": "toy-base"})
    base = load_toy(export_checkpoint(tmp_path))
    assert base.unet.config.in_channels == 24
    assert (tmp_path / "loss.png").stat().st_size > 0  # the card's loss curve, drawn by the export too


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m miva.toy train-base"):
        load_toy(tmp_path)


def test_text_encoder_names_motions_and_keeps_the_empty_prompt(tmp_path):
    from miva.toy.base import UNNAMED, motion_prompt

    assert motion_prompt("move-up-left") == "move up left" and motion_prompt("camera-zoom-in") == "camera zoom in"
    assert [motion_prompt(m) for m in UNNAMED] == [""]
    unet, prompt, text = new_toy(seed=1)
    save_toy(unet, prompt, tmp_path / "toy", text=text)
    base = load_toy(tmp_path / "toy")
    embeds = base.prompt_embeds(["", "move left", "rotate-cw"])
    assert embeds.shape == (3, 4, 64) and torch.equal(embeds[0], base.null_prompt_embeds[0])
    assert torch.equal(embeds[1, 2:], base.null_prompt_embeds[0, 2:]) and not torch.equal(embeds[1], embeds[2])
    with pytest.raises(ValueError, match="no word 'wiggle'"):
        base.prompt_embeds(["wiggle left"])
    with pytest.raises(ValueError, match="at most 4 words"):
        base.prompt_embeds(["move up left right down"])
    # one prompt per clip is the same as each clip alone
    x = torch.randn(2, 24, 3, 16, 16)
    both = base.denoise(x, torch.tensor([500, 500]), embeds[1:])
    alone = torch.cat([base.denoise(x[i:i + 1], torch.tensor([500]), embeds[i + 1:i + 2]) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


def test_a_base_without_text_accepts_only_the_empty_prompt(tmp_path):
    unet, prompt, _ = new_toy()
    save_toy(unet, prompt, tmp_path / "toy")  # weights from before the text encoder
    base = load_toy(tmp_path / "toy")
    assert torch.equal(base.prompt_embeds([""])[0], base.null_prompt_embeds[0])
    with pytest.raises(ValueError, match="without its text encoder; leave the prompt empty"):
        base.prompt_embeds(["move left"])


def test_captions_are_seeded_and_dropped_at_the_given_rate():
    from miva.toy.train_base import base_motions, base_prompts

    assert base_prompts(3, 17, 0.0) == [m.replace("-", " ") if m != "bounce" else "" for m in base_motions(3, 17)]
    assert base_prompts(4, 64, 0.5) == base_prompts(4, 64, 0.5) != base_prompts(5, 64, 0.5)
    assert set(base_prompts(4, 64, 1.0)) == {""}
    dropped = np.mean([p == "" for s in range(20) for p in base_prompts(s, 64, 0.2)])
    assert 0.2 < dropped < 0.3  # 0.2 plus the unnamed bounce clips (1 in 17)


def test_emphasised_motions_come_twice_as_often_and_others_are_refused():
    from miva.toy.train_base import BASE_MOTIONS, base_motions, motion_cycle

    shown = base_motions(0, 2 * (len(BASE_MOTIONS) + 2), ("rotate-cw", "camera-zoom-in"))
    assert shown.count("rotate-cw") == shown.count("camera-zoom-in") == 4 and shown.count("bounce") == 2
    assert base_motions(1, len(BASE_MOTIONS)) == list(BASE_MOTIONS)  # no emphasis: the cycle toy-v1 and toy-v2 saw (toy-v3 had emphasis)
    with pytest.raises(ValueError, match="--emphasis takes base motions .* not spin"):
        motion_cycle(("spin",))


def test_a_share_of_clips_shows_two_objects_moving_each_their_own_way():
    from miva.toy.base import WORLDS
    from miva.toy.train_base import MULTI, base_clips, base_motions, base_prompts, main
    from miva.toy.world import make_clip

    assert base_motions(2, 64, multi=0.0) == base_motions(2, 64)  # the default changes nothing
    shown = [m for s in range(8) for m in base_motions(s, 64, multi=0.3)]
    assert 0.22 < shown.count(MULTI) / len(shown) < 0.38
    motions, prompts = base_motions(0, 16, multi=0.5), base_prompts(0, 16, 0.0, multi=0.5)
    assert MULTI in motions and all(p == "" for m, p in zip(motions, prompts) if m == MULTI)
    two, pairs = dataclasses.replace(WORLDS["free-bold"], num_objects=2), []
    for seed, (motion, frames) in enumerate(zip(motions, base_clips(0, 16, "free-bold", multi=0.5))):
        if motion == MULTI:
            clip = make_clip(MULTI, seed, two)
            assert np.array_equal(frames, clip.frames) and len(clip.params["objects"]) == 2
            pairs.append([o["motion"] for o in clip.params["objects"]])
    assert any(a != b for a, b in pairs)  # each object draws its own motion
    with pytest.raises(SystemExit):
        main(["--multi", "1.5", "--steps", "1"])


def test_train_base_from_init_weights(tmp_path):
    from safetensors.torch import load_file

    from miva.toy.train_base import main

    unet, prompt, text = new_toy(seed=5)
    save_toy(unet, prompt, tmp_path / "init", text=text)
    main(["--init", str(tmp_path / "init"), "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "2",
          "--warmup", "1", "--threads", "1", "--device", "cpu", "--zero-snr", "--world", "free"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world"] == "free"
    run, init = load_toy(tmp_path / "run"), load_toy(tmp_path / "init")
    schedule = run.scheduler  # the schedule it was trained on travels with the weights
    assert schedule.config.rescale_betas_zero_snr and schedule.alphas_cumprod[-1] < 1e-6
    assert not init.scheduler.config.rescale_betas_zero_snr
    # DCTInit follows the schedule unless the card says: on zero-SNR it would only share the frames' noise
    assert not run.dct_init and init.dct_init
    assert load_toy().dct_init is False  # the shipped base
    frames = MivaPipeline(run)(torch.rand(3, 32, 32), num_frames=4, num_inference_steps=3, seed=0).frames
    assert frames.shape == (4, 32, 32, 3)  # sampling starts from pure noise at t = T
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    fresh = new_toy(seed=0)[0].conv_in.weight.detach()  # what the run starts from without --init
    assert torch.allclose(trained["unet.conv_in.weight"], unet.conv_in.weight.detach(), atol=1e-3)
    assert not torch.allclose(trained["unet.conv_in.weight"], fresh, atol=1e-3)
    assert torch.allclose(trained["text.words"], text.words.detach(), atol=1e-3)
    with pytest.raises(SystemExit):
        main(["--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "run2"), "--steps", "1"])
    shutil.rmtree(tmp_path / "init")  # resuming needs only the checkpoint, and the same options
    main(["--init", str(tmp_path / "init"), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "2",
          "--warmup", "1", "--threads", "1", "--device", "cpu", "--zero-snr", "--world", "free", "--resume"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["trained_steps"] == 2


def test_the_shipped_checkpoint_resumes_with_the_documented_command(tmp_path):
    from safetensors.torch import load_file

    from miva.toy.base import ASSET
    from miva.toy.train_base import main

    shutil.copytree(ASSET / "checkpoint", tmp_path / "checkpoint")
    steps = json.loads((ASSET / "config.json").read_text())["trained_steps"]
    # assets/toy-base/README.md: train-base --init assets/toy-base --zero-snr --world free-bold --batch 64 --lr 3e-4
    # --warmup 20 --ema 0.995 --emphasis (ten motions) --resume (no steps left here)
    twice = ["rotate-cw", "rotate-ccw", "camera-zoom-in", "camera-zoom-out"]
    main(["--out", str(tmp_path), "--init", "assets/toy-base", "--zero-snr", "--world", "free-bold", "--batch", "64",
          "--lr", "3e-4", "--warmup", "20", "--ema", "0.995", "--emphasis", *twice, *twice, "camera-pan-left",
          "camera-pan-right", "--resume", "--steps", str(steps), "--device", "cpu"])
    exported, shipped = load_file(str(tmp_path / "model.safetensors")), load_file(str(ASSET / "model.safetensors"))
    assert exported.keys() == shipped.keys()
    assert all(torch.equal(exported[k], shipped[k]) for k in shipped if not k.endswith(".pe"))
    # the motion modules' sinusoidal tables are rebuilt, not saved by training: computed on the GPU they differ by 1e-6
    assert all(torch.allclose(exported[k], shipped[k], atol=1e-5) for k in shipped if k.endswith(".pe"))


def test_fine_attention_grows_a_base_that_starts_as_it_was(tmp_path):
    from safetensors.torch import load_file

    from miva.toy.base import load_toy_weights
    from miva.toy.train_base import main

    unet, prompt, text = new_toy(seed=5)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # a base that draws something besides frame 0
    save_toy(unet, prompt, tmp_path / "init", text=text)
    grown = new_toy(seed=9, fine_attention=True)
    load_toy_weights(load_file(str(tmp_path / "init" / "model.safetensors")), *grown, grow=True)
    save_toy(grown[0], grown[1], tmp_path / "grown", text=grown[2])
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    before, after = (load_toy(tmp_path / name) for name in ("init", "grown"))
    assert hasattr(after.unet.down_blocks[0], "attentions") and not hasattr(before.unet.down_blocks[0], "attentions")
    assert after.id == f"{BASE_ID}-fine-attention" != before.id  # an adapter made for the other UNet is refused
    frames = [MivaPipeline(base)(image, num_frames=4, num_inference_steps=2, seed=0).frames for base in (before, after)]
    assert np.array_equal(*frames)
    # the CLI grows it the same way, and its export loads as a base with the 16x16 attention
    options = ["--steps", "1", "--batch", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]
    main(["--init", str(tmp_path / "init"), "--out", str(tmp_path / "run"), "--fine-attention", *options])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fine_attention"] is True
    assert hasattr(load_toy(tmp_path / "run").unet.up_blocks[-1], "attentions")
    with pytest.raises(SystemExit):  # a grown base is not an --init for the plain UNet
        main(["--init", str(tmp_path / "grown"), "--out", str(tmp_path / "run2"), *options])
