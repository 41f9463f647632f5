"""Attach/detach, parity with the stock model, multi-adapter mixing (eq. S4), save/load."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from miva.adapter import adapters_of, attach, check_adapter_name, detach
from miva.adapter_files import load_adapter, save_adapter
from miva.config import MivaConfig
from miva.processors import CrossFrameAttnProcessor

from conftest import randomize, unet_inputs


def forward(base, frames=4, seed=0):
    sample, t, embeds = unet_inputs(base, frames, seed)
    with torch.no_grad():
        return base.unet(sample, t, encoder_hidden_states=embeds).sample


def test_untrained_adapter_reproduces_stock_model(tiny_base):
    stock = forward(tiny_base)
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"))
    assert manager.context.weights == {"default": 1.0}  # the CFA path really runs
    assert torch.allclose(forward(tiny_base), stock, atol=1e-5)


def test_detach_restores_the_stock_model_exactly(tiny_base):
    unet = tiny_base.unet
    stock = forward(tiny_base)
    processors = dict(unet.attn_processors)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    attributes = set(vars(unet))
    randomize(attach(unet, MivaConfig(base="tiny"), "a").parameters("a"))
    attach(unet, MivaConfig(base="tiny"), "b")
    assert not torch.equal(forward(tiny_base), stock)
    detach(unet)
    assert torch.equal(forward(tiny_base), stock)
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert set(vars(unet)) == attributes
    assert not any("lora" in n or "processor" in n for n, _ in unet.named_parameters())


def test_adapters_change_the_output_and_weight_zero_is_the_base(tiny_base):
    stock = forward(tiny_base)
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    attach(tiny_base.unet, MivaConfig(base="tiny"), "b")
    randomize(manager.parameters("b"), seed=2)
    assert manager.context.weights == {"a": 1.0, "b": 1.0}  # outside a call: every adapter as trained
    mixed = forward(tiny_base)
    assert (mixed - stock).abs().max() > 1e-3
    with manager.call(weights={"a": 0.0, "b": 0.0}):
        assert torch.allclose(forward(tiny_base), stock, atol=1e-6)
    with manager.call(weights={}):
        assert torch.allclose(forward(tiny_base), stock, atol=1e-6)
    assert torch.equal(forward(tiny_base), mixed)  # the call's state is gone after it


def test_one_adapter_at_weight_one_equals_it_alone(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    alone = forward(tiny_base)
    attach(tiny_base.unet, MivaConfig(base="tiny"), "b")
    randomize(manager.parameters("b"), seed=2)
    with manager.call(weights={"a": 1.0, "b": 0.0}):
        assert torch.allclose(forward(tiny_base), alone, atol=1e-6)
    detach(tiny_base.unet, "b")
    assert torch.allclose(forward(tiny_base), alone, atol=1e-6)


def test_weights_scale_each_adapter_contribution(tiny_base):
    """Eq. S4 at one layer: the CFA term of a weighted adapter scales linearly with its weight."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", implicit_prompt_rank=0, temporal_lora_rank=0), "a")
    randomize(manager.parameters("a"))
    name = next(n for n, p in manager._processors.items() if isinstance(p, CrossFrameAttnProcessor))
    attn = tiny_base.unet.get_submodule(name)
    hidden = torch.randn(4, 16, attn.to_q.in_features)
    manager.context._record_pass(num_frames=4, temb=torch.randn(1, 64))  # what the UNet's hooks record
    outs = {}
    for w in (0.0, 0.5, 1.0):
        with manager.call(weights={"a": w}), torch.no_grad():
            outs[w] = attn(hidden)
    assert torch.allclose(outs[0.5] - outs[0.0], 0.5 * (outs[1.0] - outs[0.0]), atol=1e-5)


def test_merged_lora_gives_the_unmerged_output_and_restores_the_base_bit_for_bit(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    attach(tiny_base.unet, MivaConfig(base="tiny"), "b")
    randomize(manager.parameters("b"), seed=2)
    before = {n: p.detach().clone() for n, p in tiny_base.unet.named_parameters()}
    with manager.call(weights={"a": 0.7, "b": 0.4}):
        unmerged = forward(tiny_base)
        with manager.merged_lora() as merged:
            assert merged
            folded = forward(tiny_base)
    assert torch.allclose(folded, unmerged, atol=1e-5)
    assert (folded - unmerged).abs().max() > 0  # the folded path really ran (one matmul, other rounding)
    after = dict(tiny_base.unet.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
    with manager.call(weights={"a": 0.7, "b": 0.4}):
        assert torch.equal(forward(tiny_base), unmerged)


def test_merged_lora_refuses_changes_and_is_skipped_where_passes_differ(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    with manager.call(weights={"a": 1.0}) as call, manager.merged_lora():
        with pytest.raises(RuntimeError, match="leave merged_lora"):
            call.set(weights={"a": 0.5})
    region = torch.ones(1, 4, 8, 8)
    with manager.call(weights={"a": 1.0}, regions={"a": region}), manager.merged_lora() as merged:
        assert not merged  # a confined adapter's LoRA is weighted per token: nothing to fold


@pytest.mark.parametrize("weight", [-0.1, 2.5, math.nan, math.inf, "heavy"])
def test_bad_weights_are_refused(tiny_base, weight):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    with pytest.raises(ValueError, match="weight of adapter 'a'"), manager.call(weights={"a": weight}):
        pass


def test_unknown_adapter_weight_is_refused(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    with pytest.raises(KeyError, match="no adapter named 'zoom'"), manager.call(weights={"zoom": 1.0}):
        pass


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65, "a.b"])
def test_adapter_names_cannot_be_paths(name):
    with pytest.raises(ValueError, match="not allowed"):
        check_adapter_name(name)


def test_only_the_trained_adapter_requires_grad(tiny_base):
    unet = tiny_base.unet
    manager = attach(unet, MivaConfig(base="tiny"), "a")
    attach(unet, MivaConfig(base="tiny"), "b")
    manager.set_trainable("a")
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    assert len(trainable) == len(manager.parameters("a"))
    with manager.call(weights={"a": 1.0, "b": 0.5}):  # PEFT's set_adapter must not steal the flags
        assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable


def test_zero_initialised_output_gets_gradient_first(tiny_base):
    """With W_O = 0, W_Q gets no gradient until W_O grows (DESIGN.md): only W_O, φ-free terms move."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    manager.set_trainable("a")
    sample, t, embeds = unet_inputs(tiny_base)
    tiny_base.unet(sample, t, encoder_hidden_states=embeds).sample.pow(2).mean().backward()
    grads = {k: p.grad for k, p in manager.parameters("a").items()}
    assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items() if "to_out.weight" in k)
    assert all(g is None or g.abs().sum() == 0 for k, g in grads.items() if "processor.adapters.to_q" in k)


# -- files -----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tiny_base, tmp_path):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", motion="zoom in"), "zoom")
    randomize(manager.parameters("zoom"))
    expected = forward(tiny_base)
    folder = save_adapter(tiny_base.unet, "zoom", tmp_path / "zoom")
    detach(tiny_base.unet)
    return folder, expected


def test_round_trip_reproduces_the_adapter(tiny_base, saved):
    folder, expected = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert load_adapter(tiny_base.unet, folder, base="tiny") == "zoom"
    assert torch.equal(forward(tiny_base), expected)
    card = (folder / "README.md").read_text()
    assert "zoom in" in card and "base model `tiny`" in card and "library_name: miva" in card


def test_adapter_for_another_base_is_refused(tiny_base, saved):
    folder, _ = saved
    with pytest.raises(ValueError, match="made for base 'tiny' but the loaded base is 'animatediff-v3'"):
        load_adapter(tiny_base.unet, folder, base="animatediff-v3")
    assert adapters_of(tiny_base.unet) is None  # nothing half-attached


def test_missing_keys_are_refused(tiny_base, saved):
    folder, expected = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(dict(list(tensors.items())[1:]), folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 of the adapter's"):
        load_adapter(tiny_base.unet, folder, base="tiny")
    assert adapters_of(tiny_base.unet) is None


def test_wrong_rank_is_refused(tiny_base, saved):
    folder, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["temporal_lora_rank"] = 16
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the rank or base differs"):
        load_adapter(tiny_base.unet, folder, base="tiny")


def test_corrupt_weights_are_refused(tiny_base, saved):
    folder, _ = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(tiny_base.unet, folder, base="tiny")


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_files_are_named(tiny_base, saved, missing):
    folder, _ = saved
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_adapter(tiny_base.unet, folder, base="tiny")


def test_bad_config_json_is_refused(tiny_base, saved):
    folder, _ = saved
    (folder / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_base.unet, folder, base="tiny")
