"""The toy base's pieces: exact pixel-shuffle VAE, save/export/load, first-frame conditioning."""

import json
import shutil

import pytest
import torch

from miva.pipeline import MivaPipeline
from miva.toy.base import (BASE_ID, PixelShuffleVAE, ToyBase, export_checkpoint, load_toy, new_toy, save_toy,
                           toy_parameters)
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
    assert isinstance(base, ToyBase) and base.unet.config.in_channels == 24 and base.id == BASE_ID
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps(config | {"base": "toy-custom"}))
    assert load_toy(tmp_path / "toy").id == "toy-custom"  # the id its card names: adapters record it
    # stored in fp16, run in fp32
    assert base.dtype == torch.float32 and all(torch.equal(a, b.half().float())
                                               for a, b in zip(base.unet.state_dict().values(), unet.state_dict().values()))
    out = MivaPipeline(base)(torch.rand(3, 32, 32), num_frames=4, num_inference_steps=2, seed=0)
    assert out.frames.shape == (4, 32, 32, 3)
    first = (torch.rand(3, 32, 32) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    frames = MivaPipeline(base)(first, num_frames=3, num_inference_steps=3, seed=0).frames
    # exact VAE, and an untrained base (conv_out = 0) predicts "the first frame" everywhere: a clean copy
    assert all(abs(f.astype(int) - first).max() <= 1 for f in frames)


def test_export_takes_the_ema_weights(tmp_path):
    params = toy_parameters(*new_toy())
    run_training(params, lambda step, gen: sum(p.pow(2).sum() for p in params.values()) * 1e-6, 2, tmp_path / "run",
                 checkpoint_every=1, ema=0.5, meta={"what": "toy-base"})
    base = load_toy(export_checkpoint(tmp_path / "run", tmp_path / "out"))
    assert base.unet.config.in_channels == 24
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0  # the card's loss curve, drawn by the export too
    with pytest.raises(FileNotFoundError, match="train-base --run"):
        export_checkpoint(tmp_path / "out", tmp_path / "again")


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
    assert base_motions(1, len(BASE_MOTIONS)) == list(BASE_MOTIONS)
    with pytest.raises(ValueError, match="--emphasis takes base motions .* not spin"):
        motion_cycle(("spin",))


def test_train_base_from_init_weights(tmp_path):
    from safetensors.torch import load_file

    from miva.toy.train_base import main

    unet, prompt, text = new_toy(seed=5)
    save_toy(unet, prompt, tmp_path / "init", text=text)
    options = ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--batch", "2", "--warmup", "1",
               "--threads", "1", "--device", "cpu"]
    main(["--init", str(tmp_path / "init"), "--steps", "1", *options])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["trained_steps"] == 1
    run = load_toy(tmp_path / "out")
    assert run.scheduler.config.rescale_betas_zero_snr and run.scheduler.alphas_cumprod[-1] < 1e-6
    assert not run.dct_init  # on zero-SNR it would only share the frames' noise
    frames = MivaPipeline(run)(torch.rand(3, 32, 32), num_frames=4, num_inference_steps=3, seed=0).frames
    assert frames.shape == (4, 32, 32, 3)  # sampling starts from pure noise at t = T
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    fresh = new_toy(seed=0)[0].conv_in.weight.detach()  # what the run starts from without --init
    assert torch.allclose(trained["unet.conv_in.weight"].float(), unet.conv_in.weight.detach(), atol=1e-3)
    assert not torch.allclose(trained["unet.conv_in.weight"].float(), fresh, atol=1e-3)
    assert torch.allclose(trained["text.words"].float(), text.words.detach(), atol=1e-3)
    with pytest.raises(SystemExit):
        main(["--init", str(tmp_path / "nothing"), "--run", str(tmp_path / "run2"), "--steps", "1"])
    shutil.rmtree(tmp_path / "init")  # resuming needs only the checkpoint, and the same options
    main(["--init", str(tmp_path / "init"), "--steps", "2", "--resume", *options])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["trained_steps"] == 2


def test_the_shipped_weights_are_fp16_and_load_in_fp32():
    from safetensors.torch import load_file

    from miva.toy.base import ASSET

    shipped = load_file(str(ASSET / "model.safetensors"))
    assert {v.dtype for v in shipped.values()} == {torch.float16}
    base = load_toy()
    assert base.dtype == torch.float32 and base.text is not None and base.dct_init is False
