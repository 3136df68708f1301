"""Which parameters of the ADM UNet train: all of them, or a parameter-efficient subset.

Fine-tuning a pre-trained denoiser under DP-SGD spreads the same noise over fewer dimensions when
fewer parameters train, makes per-example gradients cheaper, and shrinks the update a site sends.
The modes (:data:`TRAINABLE_MODES`):

- ``all``: every parameter (training from scratch needs this);
- ``attention``: the self-attention blocks only (DP-LDM, Liu et al. 2024, TMLR, Sec. 4);
- ``attention_norm``: those, plus every GroupNorm affine and the ResBlocks' timestep/label
  projections, which set the adaptive GroupNorm scale and shift (AdaGN, Dhariwal & Nichol 2021,
  Sec. 3.2);
- ``lora``: low-rank adapters of rank r on every convolution and linear layer (LoRA, Hu et al.
  2022, eq. 3: ``h = W x + B A x``), everything else frozen.

The adapters follow FFA-LoRA (Sun et al. 2024, ICLR, "Improving LoRA in Privacy-preserving
Federated Learning", Sec. 4): ``A`` is random and frozen, only ``B`` (zero at the start) trains.
Averaging the sites' ``B`` is then exactly averaging their updates ``B A`` (with both factors
trained, the mean of products is not the product of means), and DP noise enters the update
linearly, not as a product of two noisy factors. ``A`` is drawn from the global RNG when the
model is built, so a seeded build gives every site and the server the same adapters (the server
also sends them with the global weights).

An adapter is two plain ``nn.Conv*d``/``nn.Linear`` layers registered inside the layer it adapts,
added to that layer's output by a forward hook: the layer keeps its own state-dict keys (so a
checkpoint without adapters still loads, :func:`adapter_keys`), and every per-example gradient
engine sees standard layers. Hand-written because PEFT libraries replace modules (changing their
keys) and cover no 3-D convolutions.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from meddiff.nets.blocks import AttentionBlock, ResBlock

TRAINABLE_MODES = ("all", "attention", "attention_norm", "lora")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADAPTER = "low_rank"


class LowRankAdapter(nn.Module):
    """``x -> up(down(x))`` with the shapes of ``layer``: ``down`` maps ``[N, C_in, *S]`` to
    ``[N, r, *S']`` with ``layer``'s kernel, stride and padding (or ``[..., C_in] -> [..., r]`` for a
    linear layer); ``up`` maps rank ``r`` to the layer's outputs with a 1x1 kernel. ``down`` is
    drawn from N(0, 1/fan_in) and frozen; ``up`` starts at zero, so the adapted layer starts
    equal to ``layer``."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            conv = type(layer)
            self.down = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, bias=False)
            self.up = conv(rank, layer.out_channels, 1, bias=False)
        fan_in = self.down.weight[0].numel()
        with torch.no_grad():
            self.down.weight.normal_(0.0, 1.0 / math.sqrt(fan_in))
            self.up.weight.zero_()
        self.down.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _add_adapter_output(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(layer, ADAPTER)(inputs[0])


def _adaptable(model: nn.Module) -> Iterator[nn.Module]:
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.groups == 1):
            yield module


def add_low_rank_adapters(model: nn.Module, rank: int) -> int:
    """Attach a :class:`LowRankAdapter` of ``rank`` to every convolution and linear layer of
    ``model`` (in place); returns how many."""
    if rank < 1:
        raise ValueError(f"train.lora_rank must be >= 1, got {rank}")
    layers = list(_adaptable(model))
    for layer in layers:
        layer.add_module(ADAPTER, LowRankAdapter(layer, rank))
        layer.register_forward_hook(_add_adapter_output)
    return len(layers)


def _trains(mode: str, module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters ``mode`` trains among ``module``'s own."""
    if mode == "attention" and isinstance(module, AttentionBlock):
        yield from module.parameters()
    elif mode == "attention_norm":
        if isinstance(module, AttentionBlock) or isinstance(module, nn.GroupNorm):
            yield from module.parameters()
        elif isinstance(module, ResBlock):
            yield from module.emb_proj.parameters()
    elif mode == "lora" and isinstance(module, LowRankAdapter):
        yield module.up.weight


def select_trainable(model: nn.Module, mode: str, *, lora_rank: int = 4) -> nn.Module:
    """Freeze every parameter of ``model`` that ``mode`` does not train (adding the adapters
    first for ``lora``); returns ``model``. ``all`` leaves the model as it is."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"train.trainable={mode!r} is not a mode; choose one of {TRAINABLE_MODES}")
    if mode == "all":
        return model
    if mode == "lora":
        add_low_rank_adapters(model, lora_rank)
    chosen = {id(p) for m in model.modules() for p in _trains(mode, m)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if not chosen:
        raise ValueError(f"train.trainable={mode!r} selects no parameter of this model")
    return model


def update_keys(model: nn.Module) -> list[str]:
    """The state-dict keys an update of ``model`` carries: every key when every parameter
    trains, otherwise only the trainable parameters (frozen tensors never change)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return list(model.state_dict())
    return [k for k in model.state_dict() if k in params and params[k].requires_grad]


def adapter_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the low-rank adapters (absent from a checkpoint trained without)."""
    return [k for k in model.state_dict() if f".{ADAPTER}." in f".{k}"]


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` parameter counts (adapters included in the total)."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
