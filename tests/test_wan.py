"""MIVA on Wan2.1 (`WanTransformer3DModel`): exact counts on the 1.3B config, parity, sampling, training,
loading through the Hub layout, and the cross-base and frame-count errors."""

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from miva.adapter import attach, detach
from miva.adapter_files import load_adapter, save_adapter
from miva.backends import load_base, meta_unet, wan
from miva.cli import main
from miva.config import MivaConfig
from miva.pipeline import MivaPipeline
from miva.loop import diffusion_loss, step_generator
from miva.train import train_adapter

from conftest import randomize, save_wan_layout


@pytest.fixture
def clips():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8) for _ in range(2)]


def forward(base, seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 16, frames, 4, 4, generator=g)
    with torch.no_grad():
        return base.denoise(sample, torch.tensor(700.0), base.null_prompt_embeds)


def test_exact_counts_on_the_full_config():
    """Paper §4: 35.5M = 23.6M CFA + 11.9M implicit prompt on Wan2.1-T2V-1.3B (meta device, no download)."""
    unet = meta_unet("wan2.1-1.3b")
    assert unet.config.num_layers == 30 and unet.config.num_attention_heads * unet.config.attention_head_dim == 1536
    manager = attach(unet, MivaConfig.for_base("wan2.1-1.3b"))
    counts = manager.parameter_report("default")
    weighting = sum(p.numel() for k, p in manager.parameters("default").items() if ".weighting." in k)
    d, blocks, rank = 1536, 30, 128
    assert weighting == blocks * (2 * d + 2)  # φ(c_t): Linear(1536, 2) per block
    assert counts["cross_frame_attention"] - weighting == blocks * 2 * (2 * rank * d) == 23_592_960
    assert counts["implicit_prompt"] == blocks * (2 * rank * d + 2 * rank) == 11_804_160
    assert counts["temporal_lora"] == 0
    assert counts["total"] == 35_489_340  # 35.5M


def test_params_command_on_wan(capsys):
    assert main(["params", "--base", "wan2.1-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "WanTransformer3DModel" in out and "of which the weighting" in out
    assert out.strip().splitlines()[-1] == "total 35489340"


def test_untrained_adapter_reproduces_the_stock_transformer_and_detach_restores_it(wan_base):
    stock = forward(wan_base)
    manager = attach(wan_base.unet, MivaConfig.for_base("tiny-wan"))
    assert torch.equal(forward(wan_base), stock)  # zero-initialised W_O and implicit-prompt output
    randomize(manager.parameters("default"))
    changed = forward(wan_base)
    assert not torch.allclose(changed, stock, atol=1e-4)
    with manager.call(weights={"default": 0.0}):
        assert torch.equal(forward(wan_base), stock)
    detach(wan_base.unet)
    assert torch.equal(forward(wan_base), stock)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in wan_base.unet.attn_processors.values())


def test_cfa_reads_latent_frame_zero_and_the_previous_latent_frame():
    """For latent frame i the CFA's keys are those of latent frame 0 (the first frame) and of frame i-1."""
    from miva.processors import _reference_frames

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 1, 1)  # (b f, n, h, d): 4 frames, value = index
    ref = _reference_frames(x, 4)[0, :, :, :, 0, 0].flatten(1)  # (f, 2n)
    assert ref.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 2, 2]]


def test_frames_follow_wans_4k_plus_1_rule(wan_base, first_frame):
    pipe = MivaPipeline(wan_base)
    assert [wan_base.latent_frames(f) for f in (5, 9, 17, 81)] == [2, 3, 5, 21]
    with pytest.raises(ValueError, match=r"num_frames is 16; Wan takes 4k\+1 frames .*use 17"):
        pipe(first_frame, num_frames=16, num_inference_steps=1)
    with pytest.raises(ValueError, match="use 5"):
        pipe(first_frame, num_frames=3, num_inference_steps=1)


def test_first_latent_frame_is_the_first_frame_encoded_alone(wan_base, clips):
    from miva.data import clips_to_tensor

    pixels = clips_to_tensor(clips[:1])
    video = wan_base.encode_video(pixels)
    assert video.shape == (1, 16, 3, 4, 4)
    assert torch.allclose(wan_base.encode_image(pixels[:, :, 0]), video[:, :, 0], atol=1e-5)
    assert wan_base.decode_video(video).shape == (9, 3, 32, 32)


def test_sampling_keeps_the_first_frame_and_mixes_adapters(wan_base, first_frame):
    pipe = MivaPipeline(wan_base)
    for name, seed in (("a", 1), ("b", 2)):
        randomize(attach(wan_base.unet, MivaConfig.for_base("tiny-wan"), name).parameters(name), seed=seed, scale=0.2)
    kwargs = dict(num_frames=9, num_inference_steps=3, seed=0, adain=False)
    base = pipe(first_frame, adapters={}, **kwargs)
    assert base.frames.shape == (9, 32, 32, 3) and base.latents.shape == (1, 16, 3, 4, 4)
    first = pipe.encode(pipe.prepare_first_frame(first_frame, 32, 32))
    assert torch.equal(base.latents[:, :, 0], first)
    a = pipe(first_frame, adapters={"a": 1.0}, **kwargs).latents
    mix = pipe(first_frame, adapters={"a": 1.0, "b": 0.5}, **kwargs).latents
    off = pipe(first_frame, adapters={"a": 0.0, "b": 0.0}, **kwargs).latents
    assert torch.equal(off, base.latents)
    assert not torch.allclose(a, base.latents) and not torch.allclose(mix, a)
    masked = pipe(first_frame, adapters={"a": 1.0}, masks={"a": np.pad(np.ones((32, 16)), ((0, 0), (0, 16)))}, **kwargs)
    assert masked.regions.shape == (9, 32, 32) and not torch.allclose(masked.latents, a)


def test_a_training_step_lowers_the_loss_on_a_fixed_batch(wan_base, clips):
    pipe = MivaPipeline(wan_base)
    latents = pipe.encode_clips(clips)
    manager = attach(wan_base.unet, MivaConfig.for_base("tiny-wan"), "m")
    manager.set_trainable("m")
    params = list(manager.parameters("m").values())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    timesteps = torch.tensor([300.0, 800.0])

    def loss():
        return diffusion_loss(wan_base, latents, step_generator(0, 0), timesteps=timesteps)

    before = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before


def test_flow_matching_schedule(wan_base):
    latents, noise = torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1)
    t = torch.tensor([250.0])
    assert torch.allclose(wan_base.add_noise(latents, noise, t), torch.full_like(latents, 0.75))
    assert torch.equal(wan_base.training_target(latents, noise, t), noise - latents)
    drawn = wan_base.sample_timesteps(64, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() <= 1000
    signal, sigma = wan_base.noise_levels(975)
    assert float(sigma) == pytest.approx(0.975) and float(signal) == pytest.approx(0.025)


def test_train_save_and_reload_round_trip(wan_base, clips, tmp_path):
    pipe = MivaPipeline(wan_base)
    folder = train_adapter(pipe, clips, tmp_path / "pan", "pan", steps=4, checkpoint_every=2, preview_steps=2, lr=1e-2)
    config = MivaConfig.load(folder)
    assert (config.base, config.cfa_rank, config.temporal_lora_rank) == ("tiny-wan", 8, 0)
    name = pipe.load_adapter(folder)
    kwargs = dict(num_frames=9, num_inference_steps=2, seed=0)
    first = pipe(clips[0][0], adapters={name: 1.0}, **kwargs).latents
    pipe.unload_adapter()
    pipe.load_adapter(folder)
    assert torch.equal(pipe(clips[0][0], adapters={name: 1.0}, **kwargs).latents, first)


def test_adapters_refuse_the_other_base(wan_base, tmp_path):
    unet_base = load_base("tiny")
    attach(unet_base.unet, MivaConfig(base="tiny"), "ad")
    save_adapter(unet_base.unet, "ad", tmp_path / "ad")
    with pytest.raises(ValueError, match="made for base 'tiny' but the loaded base is 'tiny-wan'"):
        load_adapter(wan_base.unet, tmp_path / "ad", base="tiny-wan")
    attach(wan_base.unet, MivaConfig.for_base("tiny-wan"), "wn")
    save_adapter(wan_base.unet, "wn", tmp_path / "wn")
    detach(unet_base.unet)
    with pytest.raises(ValueError, match="made for base 'tiny-wan' but the loaded base is 'tiny'"):
        load_adapter(unet_base.unet, tmp_path / "wn", base="tiny")


def test_a_temporal_lora_is_refused_on_wan(wan_base):
    with pytest.raises(ValueError, match="no temporal attention modules.*temporal_lora_rank=0"):
        attach(wan_base.unet, MivaConfig(base="tiny-wan"))
    assert not hasattr(wan_base.unet, "_miva_adapters")


def test_real_loading_path_through_the_hub_layout(tmp_path):
    """`wan.load` on tiny random components saved in Wan-AI/Wan2.1-T2V-1.3B-Diffusers' folder layout."""
    save_wan_layout(tmp_path, seed=3)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    loaded = wan.load(str(tmp_path), base_id="tiny-wan", height=32, width=32, frames=9, text_dtype=torch.float32)
    built = load_base("tiny-wan", seed=3)
    assert loaded.null_prompt_embeds.shape == (1, wan.PROMPT_TOKENS, 16)
    assert loaded.null_prompt_embeds[:, 1:].abs().sum() == 0  # the empty prompt is one token, then zeros
    assert torch.allclose(loaded.null_prompt_embeds[:, :8], built.null_prompt_embeds, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 16, 3, 4, 4, generator=g)
    with torch.no_grad():
        for module in ("unet", "vae"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(loaded, module).state_dict().values(),
                                                          getattr(built, module).state_dict().values()))
        out = loaded.denoise(sample, torch.tensor(500.0), loaded.null_prompt_embeds)
    assert out.shape == sample.shape


def test_the_real_base_loads_in_bf16_with_an_fp32_vae(tmp_path, first_frame):
    save_wan_layout(tmp_path)
    base = wan.load(str(tmp_path), height=32, width=32, frames=5, dtype=torch.bfloat16, text_dtype=torch.float32)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in base.unet.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert base.unet.dtype == torch.bfloat16  # its norms, time embedder and modulation kept in fp32, as diffusers loads it
    built = wan.tiny(dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in built.unet.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert {p.dtype for p in base.vae.parameters()} == {torch.float32}  # as Wan's pipeline keeps it
    assert base.null_prompt_embeds.dtype == torch.bfloat16
    out = MivaPipeline(base)(first_frame, num_frames=5, num_inference_steps=2, seed=0)  # fp32 latents, bf16 transformer
    assert out.frames.shape == (5, 32, 32, 3) and torch.isfinite(out.latents.float()).all()


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_pickled_wan_weights_are_never_loaded(tmp_path, component):
    save_wan_layout(tmp_path, pickled=(component,))
    assert not list((tmp_path / component).glob("*.safetensors"))
    with pytest.raises(ValueError, match=rf"{component} holds only pickled weights .* MIVA loads safetensors only"):
        wan.load(str(tmp_path), text_dtype=torch.float32)


def test_the_studio_and_its_frames_slider_follow_wans_frame_rule(wan_base, first_frame, tmp_path):
    import app
    from miva.data import load_clip
    from miva.studio import Studio

    studio = Studio(MivaPipeline(wan_base), shipped=tmp_path / "none", workdir=tmp_path / "work")
    slider = app.frames_slider(wan_base)
    assert (slider.minimum, slider.maximum, slider.step, slider.value) == (5, 81, 4, 9)
    video = studio.animate(first_frame, {}, frames=9, steps=2)
    assert load_clip(video, frames=9).shape == (9, 32, 32, 3)
    with pytest.raises(ValueError, match="use 17"):
        studio.animate(first_frame, {}, frames=16, steps=2)
