"""Attach, detach and mix MIVAs on a diffusers `UNetMotionModel` or `WanTransformer3DModel`.

`attach(unet, config, name)` installs the MIVA processors on the spatial attentions (Wan: on every
block's self- and cross-attention) and PEFT LoRA on the temporal attentions (UNet only: Wan's
attention is already 3-D); `detach(unet)` restores the stock processors, layers and flags exactly.
Several adapters can be attached at once and mixed with per-adapter weights (eq. S4). Adapter
folders are written and read by `miva.adapter_files`.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from .card import PART_NAMES, part_of
from .config import MivaConfig
from .context import MivaContext
from .processors import CrossFrameAttnProcessor, ImplicitPromptProcessor, TemporalBiasProcessor
from .wan_processors import WanCrossFrameAttnProcessor, WanImplicitPromptProcessor

MAX_WEIGHT = 2.0  # adapter weights live in [0, MAX_WEIGHT]; 1 is the adapter as trained
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class _Layout:
    """Where MIVA enters one kind of denoiser."""

    attentions: re.Pattern  # names of the attentions that get processors; group "kind": attn1 (CFA) or attn2
    processors: tuple[type, type]  # (CFA processor, implicit-prompt processor)
    temb: str  # the module whose output is the timestep embedding c_t, (b, d_t)
    frame_axis_stride: str  # config key of the temporal patch size ("" = 1)
    temporal_lora: bool  # has temporal attentions for the temporal LoRA
    temporal: re.Pattern | None = None  # the temporal attentions, which get M-MIVA's t-SA bias


# UNetMotionModel's spatial `...attentions.N.transformer_blocks.M.attn1|attn2` (not the motion modules').
_UNET = _Layout(
    re.compile(r"^(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.transformer_blocks\.\d+\.(?P<kind>attn[12])$"),
    (CrossFrameAttnProcessor, ImplicitPromptProcessor), "time_embedding", "", True,
    re.compile(r"^(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]$"))
# WanTransformer3DModel: every block's 3-D self-attention (attn1) and text cross-attention (attn2).
_WAN = _Layout(re.compile(r"^blocks\.\d+\.(?P<kind>attn[12])$"), (WanCrossFrameAttnProcessor, WanImplicitPromptProcessor),
               "condition_embedder.time_embedder", "patch_size", False)


def _layout(model) -> _Layout:
    return _WAN if type(model).__name__ == "WanTransformer3DModel" else _UNET


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '-' or '_', starting with a letter or digit."
        )
    return name


def check_weight(name: str, weight: float) -> float:
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"the weight of adapter '{name}' must be a number, not {weight!r}.") from None
    if not math.isfinite(weight) or not 0.0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"the weight of adapter '{name}' is {weight}; use a number from 0 to {MAX_WEIGHT:g}.")
    return weight


def _lora_target_regex(targets) -> str:
    projections = "|".join(re.escape(t) for t in targets)
    return rf".*motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.({projections})"


class MivaAdapters:
    """The MIVAs attached to one UNet: their processors, LoRA layers, weights and context."""

    def __init__(self, unet, base: str):
        self.unet = unet
        self.base = base
        self.context = MivaContext()
        self._weights_applied = False  # the LoRA scales may be skipped only after they were set once
        self._merged: frozenset = frozenset()  # adapters whose temporal LoRA is folded into the base (merged_lora)
        self.configs: dict[str, MivaConfig] = {}
        self.trainable: str | None = None
        self._requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
        self._had_peft_config = hasattr(unet, "peft_config")
        self._stock: dict[str, object] = {}
        self.layout = _layout(unet)
        self._processors: dict[str, CrossFrameAttnProcessor | ImplicitPromptProcessor | TemporalBiasProcessor] = {}
        for name, module in unet.named_modules():
            match = self.layout.attentions.match(name)
            if match is not None:
                kind = self.layout.processors[0 if match.group("kind") == "attn1" else 1]
            elif self.layout.temporal is not None and self.layout.temporal.match(name):
                kind = TemporalBiasProcessor
            else:
                continue
            self._stock[name] = module.processor
            self._processors[name] = kind(module, module.processor, self.context)
        if not any(isinstance(p, CrossFrameAttnProcessor) for p in self._processors.values()):
            raise ValueError("this model has no spatial transformer blocks; MIVA needs a UNetMotionModel or "
                             "WanTransformer3DModel base.")
        for name, processor in self._processors.items():
            unet.get_submodule(name).set_processor(processor)
        self._temb = unet.get_submodule(self.layout.temb)
        self._hooks = [
            unet.register_forward_pre_hook(self._record_frames, with_kwargs=True),
            self._temb.register_forward_hook(self._record_temb),
        ]

    # -- per-call state -------------------------------------------------------------------------
    def _record_frames(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        stride = self.layout.frame_axis_stride
        # Both take (b, c, f, h, w); Wan's patches may span several latent frames.
        self.context._record_pass(num_frames=sample.shape[2] // (self.unet.config[stride][0] if stride else 1))

    def _record_temb(self, module, args, output):
        self.context._record_pass(temb=output)  # (b, d_t): c_t per clip, before diffusers repeats it per frame

    @contextlib.contextmanager
    def call(self, **state):
        """The per-call state of the passes run inside the block; what it was comes back on exit.

        Yields a `MivaCall` whose `set(...)` changes it between passes. The state (see
        `miva.context.CallState`): `weights` {name: weight} (eq. S4; adapters not named are off),
        `regions` {name: (b, F, H, W) at the latent grid} with `exclusive` (the names that reach a
        coarser layer's token only where all of it is in their region), M-MIVA `streams` (the video,
        then one mask clip per M-MIVA named) and `subjects` {name: (b, F, H, W) confidence S}.
        Outside any call every attached adapter acts at weight 1, everywhere, with no mask stream.
        """
        before = self.context._snapshot()
        handle = MivaCall(self)
        try:
            handle.set(**state)
            yield handle
        finally:
            before["weights"] = {n: w for n, w in before["weights"].items() if n in self.configs}
            self._apply(**before)

    @contextlib.contextmanager
    def merged_lora(self):
        """Fold the active adapters' temporal LoRA, at their current weights, into the base projections
        for the passes inside the block (one matmul per projection instead of three and an add); the
        base weights come back bit for bit on exit (the original tensors are put back, not re-derived).

        Only for passes that all share these weights, unconfined, with no mask clip in the batch (the
        sampler's plain case); yields whether anything was merged.
        """
        active = [n for n, w in self.context.weights.items() if w != 0 and self.configs[n].temporal_lora_rank]
        if not active or any(n in self.context.regions for n in active) or self.context.streams != (None,):
            yield False
            return
        merged = []
        try:
            with torch.no_grad():
                for layer in self._lora_layers():
                    names = [n for n in active if n in layer.lora_A]
                    if names:
                        weight = layer.get_base_layer().weight
                        original = weight.data
                        weight.data = original + sum(layer.get_delta_weight(n) for n in names).to(original.dtype)
                        layer.merged_adapters.extend(names)  # PEFT's forward then runs the base layer alone
                        merged.append((layer, weight, original))
            self._merged = frozenset(active)
            yield True
        finally:
            for layer, weight, original in merged:
                weight.data = original
                layer.merged_adapters.clear()
            self._merged = frozenset()

    def _apply(self, weights=None, regions=None, exclusive=None, streams=None, subjects=None) -> None:
        """The one writer of the per-call state; fields left None keep their value."""
        changes = {}
        if self._merged and ((weights is not None and weights != self.context.weights)
                             or (streams is not None and tuple(streams) != (None,))
                             or (regions is not None and any(n in regions for n in self._merged))):
            raise RuntimeError("the temporal LoRA is merged for these weights; leave merged_lora() before changing them.")
        if weights is not None:
            for name in weights:
                if name not in self.configs:
                    raise KeyError(f"no adapter named '{name}' is attached; attached: {sorted(self.configs) or 'none'}.")
            weights = {name: check_weight(name, w) for name, w in weights.items()}
            if weights != self.context.weights or not self._weights_applied:
                self._apply_weights(weights)
            changes["weights"] = weights
        if regions is not None:
            for name in regions:
                if name not in self.configs:
                    raise KeyError(f"a region was given for '{name}', which is not attached; "
                                   f"attached: {sorted(self.configs) or 'none'}.")
            changes["regions"] = regions
        if exclusive is not None:
            changes["exclusive"] = frozenset(exclusive)
        if streams is not None:
            changes["streams"] = tuple(streams)
        if subjects is not None:
            changes["subjects"] = subjects
        self.context._set(**changes)

    def _apply_weights(self, weights: dict[str, float]) -> None:
        active = [n for n, w in weights.items() if w != 0]
        for layer in self._lora_layers():
            layer.set_adapter(active, inference_mode=True)  # freezes all LoRA weights ...
            for name, w in weights.items():
                layer.set_scale(name, w)
        self._apply_trainable()  # ... so give the trained adapter its gradients back
        self._weights_applied = True

    def _regional(self, name: str):
        def hook(module, args, output):  # (S b h w, F, c): the weight is applied by PEFT's scaling
            return self.context.weighted(name, 1.0, output, temporal=True)

        return hook

    def set_trainable(self, name: str | None) -> None:
        """Make exactly this adapter's parameters trainable (None: none); the base stays frozen."""
        if name is not None and name not in self.configs:
            raise KeyError(f"no adapter named '{name}' is attached.")
        self.trainable = name
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        for adapter in self.configs:
            for p in self.parameters(adapter).values():
                p.requires_grad_(adapter == self.trainable)

    # -- structure -------------------------------------------------------------------------------
    def _lora_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    def add(self, config: MivaConfig, name: str) -> None:
        check_adapter_name(name)
        if name in self.configs:
            raise ValueError(f"an adapter named '{name}' is already attached; detach it or pick another name.")
        if config.base != self.base:
            raise ValueError(f"this adapter was made for base '{config.base}' but the loaded base is '{self.base}'.")
        if config.temporal_lora_rank and not self.layout.temporal_lora:
            raise ValueError(f"base '{self.base}' has no temporal attention modules for a temporal LoRA (its attention "
                             f"is 3-D); use temporal_lora_rank=0, as MivaConfig.for_base('{self.base}') does.")
        temb_dim = self._temb.linear_2.out_features
        for module_name, processor in self._processors.items():
            attn = self.unet.get_submodule(module_name)
            if isinstance(processor, CrossFrameAttnProcessor):
                if config.cross_frame_attention:
                    processor.add_adapter(name, attn, temb_dim, config.cfa_rank, config.cfa_temperature, config.masked)
            elif isinstance(processor, ImplicitPromptProcessor) and config.implicit_prompt_rank:
                processor.add_adapter(name, attn, config.implicit_prompt_rank, config.masked)
        if config.temporal_lora_rank:
            lora = LoraConfig(
                r=config.temporal_lora_rank,
                lora_alpha=config.temporal_lora_rank,
                target_modules=_lora_target_regex(config.temporal_lora_targets),
                init_lora_weights=True,  # B = 0: an untrained adapter changes nothing
            )
            with warnings.catch_warnings():  # PEFT warns when a second adapter joins; that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora, self.unet, adapter_name=name)
            for layer in self._lora_layers():  # confine the temporal LoRA to the adapter's region, if any
                if name in layer.lora_B:
                    layer.lora_B[name].register_forward_hook(self._regional(name))
        # PEFT marks the whole base frozen; keep the base's own flags and leave adapters off.
        for pname, param in self.unet.named_parameters():
            stock_name = pname.replace(".base_layer.", ".")
            if stock_name in self._requires_grad:
                param.requires_grad_(self._requires_grad[stock_name])
        self.configs[name] = config
        self._weights_applied = False  # new LoRA layers: apply the weights again
        self._apply(weights={**self.context.weights, name: 1.0})  # a new adapter starts active, as trained

    def remove(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"no adapter named '{name}' is attached; attached: {sorted(self.configs) or 'none'}.")
        for processor in self._processors.values():
            for modules in (processor.adapters, processor.mask_adapters):
                if name in modules:
                    del modules[name]
        for layer in self._lora_layers():
            if name in layer.lora_A:
                layer.delete_adapter(name)
        getattr(self.unet, "peft_config", {}).pop(name, None)
        del self.configs[name]
        if self.trainable == name:
            self.trainable = None
        self._weights_applied = False
        self._apply(weights={n: w for n, w in self.context.weights.items() if n != name})

    def close(self) -> None:
        """Restore the stock model: processors, plain Linear layers, requires_grad flags."""
        for name, processor in self._stock.items():
            self.unet.get_submodule(name).set_processor(processor)
        for name, module in list(self.unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.unet.get_submodule(parent_name), child, module.get_base_layer())
        for hook in self._hooks:
            hook.remove()
        if not self._had_peft_config and hasattr(self.unet, "peft_config"):
            del self.unet.peft_config
        for pname, param in self.unet.named_parameters():
            param.requires_grad_(self._requires_grad[pname])
        self.configs.clear()

    # -- parameters ------------------------------------------------------------------------------
    def parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """This adapter's parameters under canonical names (the adapter name removed)."""
        markers = (f".adapters.{name}.", f".mask_adapters.{name}.", f".lora_A.{name}.", f".lora_B.{name}.")
        found = {}
        for pname, param in self.unet.named_parameters():
            for marker in markers:
                if marker in pname:
                    found[pname.replace(marker, marker.replace(f".{name}.", "."))] = param
        return found

    def parameter_report(self, name: str) -> dict[str, int]:
        counts = dict.fromkeys(PART_NAMES, 0)
        for key, param in self.parameters(name).items():
            counts[part_of(key)] += param.numel()
        counts["total"] = sum(counts.values())
        return counts

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu").contiguous() for k, p in self.parameters(name).items()}

    def load_state_dict(self, name: str, tensors: dict[str, torch.Tensor], source: str = "the file") -> None:
        params = self.parameters(name)
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} of the adapter's {len(params)} tensors (e.g. '{missing[0]}'); it is incomplete or for another architecture.")
        if unexpected:
            raise ValueError(f"{source} has {len(unexpected)} tensors this base does not have (e.g. '{unexpected[0]}'); it was made for another architecture.")
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"{source} has '{key}' of shape {tuple(tensors[key].shape)} but this base and config need "
                    f"{tuple(param.shape)}; the rank or base differs from adapter_config.json."
                )
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(param.dtype))


class MivaCall:
    """The handle of one `MivaAdapters.call()` block: `set(...)` changes the state between passes."""

    def __init__(self, manager: MivaAdapters):
        self._manager = manager

    @property
    def context(self) -> MivaContext:
        return self._manager.context

    def set(self, weights: dict[str, float] | None = None, regions: dict[str, torch.Tensor] | None = None,
            exclusive=None, streams: tuple[str | None, ...] | None = None,
            subjects: dict[str, torch.Tensor] | None = None) -> None:
        """Change the given parts of the call's state (see `MivaAdapters.call`); the rest stays."""
        self._manager._apply(weights=weights, regions=regions, exclusive=exclusive, streams=streams, subjects=subjects)


# -- module-level API ------------------------------------------------------------------------------
def adapters_of(unet) -> MivaAdapters | None:
    return getattr(unet, "_miva_adapters", None)


def attach(unet, config: MivaConfig, name: str = "default", base: str | None = None) -> MivaAdapters:
    """Attach a freshly initialised MIVA; the first attach fixes the base id (default: config.base)."""
    manager = adapters_of(unet)
    if manager is None:
        manager = MivaAdapters(unet, base or config.base)
        unet._miva_adapters = manager
    try:
        manager.add(config, name)
    except Exception:
        if not manager.configs:
            detach(unet)
        raise
    return manager


def detach(unet, name: str | None = None) -> None:
    """Remove one adapter, or all (name=None); with none left the stock model is restored exactly."""
    manager = adapters_of(unet)
    if manager is None:
        return
    if name is not None:
        manager.remove(name)
    if name is None or not manager.configs:
        manager.close()
        del unet._miva_adapters
