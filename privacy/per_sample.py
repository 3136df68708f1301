"""Per-example gradients by book-keeping: one batched backward for activations, then each layer's
per-example weight gradient from its stored input and output gradient.

DP-SGD needs one gradient per example (then clipping, noise). The classic ways spend more than the
plain step: Opacus's ``hooks`` mode runs the normal backward, which also computes the *batched*
weight gradients it then throws away, and builds convolution gradients by unfolding the input
(nine or 27 copies of every activation); ``torch.func.vmap`` over the model turns each convolution
backward into two calls and falls back to unfused elementwise kernels. Book-keeping (Bu et al. 2023,
"Differentially Private Optimization on Large Model at Small Cost", ICML, Alg. 1) avoids both:

1. the forward pass runs batched, with hooks that keep each parametrised layer's input ``a`` and
   output ``s``;
2. ``torch.autograd.grad(loss, [s_1, ..., s_L])`` asks only for the gradients of the layer
   *outputs*, so autograd prunes every weight-gradient computation and runs the cheap half of
   each layer's backward;
3. per-example weight gradients come from ``(a, ds)`` per layer: a convolution's is a grouped
   convolution backward with the examples as groups (one oneDNN call, the cost of the batched
   weight gradient), a linear layer's a batched matrix product, GroupNorm's and an embedding's a
   reduction.

Several rows per example (noise multiplicity K: rows ``n*K .. n*K+K-1`` belong to example ``n``)
are summed inside those reductions, so the gradient of each example's loss comes out directly as
``[N, *param.shape]``, never ``[N*K, ...]``. Hand-written because no library computes per-example
gradients this way on a diffusion UNet; validated against one-example-at-a-time autograd in the
tests, like the other modes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = CONV + (nn.Linear, nn.GroupNorm, nn.Embedding)


def check_supported(module: nn.Module) -> None:
    """Raise ``ValueError`` naming a layer whose parameters this engine cannot handle."""
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own and type(m) not in SUPPORTED:
            raise ValueError(f"layer {name or '<root>'} ({type(m).__name__}) holds parameters, but per-example "
                             f"gradients by book-keeping support only {[c.__name__ for c in SUPPORTED]}; use "
                             "privacy.grad_sample_mode=hooks")
        if type(m) in CONV and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise ValueError(f"layer {name} uses padding {m.padding!r} / padding_mode {m.padding_mode!r}; "
                             "book-keeping supports explicit zero padding")


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[N*K, ...] -> [N, K, ...]``."""
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _conv(mod: nn.Module, a: torch.Tensor, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    if a.device.type == "cpu" and (a.dtype != torch.float32 or g.dtype != torch.float32):
        a, g = a.float(), g.float()  # oneDNN has no grouped bf16 weight-gradient kernel; CUDA keeps autocast's dtype
    k = a.shape[0] // n
    # [N*K, C, *S] -> [K, N*C, *S]: the N examples are groups, the K rows the batch summed over
    a_g = _rows(a, n).transpose(0, 1).reshape(k, n * a.shape[1], *a.shape[2:])
    g_g = _rows(g, n).transpose(0, 1).reshape(k, n * g.shape[1], *g.shape[2:])
    weight = a.new_zeros(()).expand(n * mod.out_channels, *mod.weight.shape[1:])  # shape only; values unused
    dims = len(mod.kernel_size)
    gw = torch.ops.aten.convolution_backward(
        g_g, a_g, weight, None, list(mod.stride), list(mod.padding), list(mod.dilation), False, [0] * dims,
        n * mod.groups, [False, True, False])[1]
    out = {"weight": gw.reshape(n, *mod.weight.shape)}
    if mod.bias is not None:
        out["bias"] = _rows(g, n).sum(dim=(1, *range(3, g.ndim + 1)))
    return out


def _linear(mod: nn.Linear, a: torch.Tensor, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])  # every row and token of an example
    out = {"weight": torch.bmm(g3.transpose(1, 2), a3)}
    if mod.bias is not None:
        out["bias"] = g3.sum(1)
    return out


def _group_norm(mod: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    x_hat = F.group_norm(a, mod.num_groups, None, None, mod.eps)  # recomputed: one pass, no stored copy
    c = a.shape[1]
    prod = (g * x_hat).reshape(n, -1, c, x_hat[0, 0].numel())
    grads = g.reshape(n, -1, c, x_hat[0, 0].numel())
    return {"weight": prod.sum(dim=(1, 3)), "bias": grads.sum(dim=(1, 3))}


def _embedding(mod: nn.Embedding, a: torch.Tensor, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    idx = a.reshape(n, -1)
    g3 = g.reshape(n, -1, g.shape[-1])
    gw = g.new_zeros(n, mod.num_embeddings, mod.embedding_dim)
    gw.scatter_add_(1, idx[..., None].expand(-1, -1, g3.shape[-1]), g3)
    return {"weight": gw}


def _per_example(mod: nn.Module, a: torch.Tensor, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    if isinstance(mod, CONV):
        return _conv(mod, a, g, n)
    if isinstance(mod, nn.Linear):
        return _linear(mod, a, g, n)
    if isinstance(mod, nn.GroupNorm):
        return _group_norm(mod, a, g, n)
    return _embedding(mod, a, g, n)


def per_example_gradients(module: nn.Module, compute_losses: Callable[[], torch.Tensor],
                          num_examples: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of each example's loss with respect to every trainable parameter of ``module``.

    Args:
        module: the (unwrapped) model; its parametrised layers must be in :data:`SUPPORTED`.
        compute_losses: runs the forward pass through ``module`` and returns the per-example
            losses ``[N]`` (e.g. ``objective.training_losses(module, x0, ...)``, which may expand
            each example to K rows internally).
        num_examples: ``N``.
    Returns:
        ``({name: [N, *param.shape]}, losses [N] detached)``.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    n = int(num_examples)
    if n == 0:
        with torch.no_grad():
            losses = compute_losses()
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}, losses.detach()
    names = {m: name for name, m in module.named_modules()}
    captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(mod, inputs, output):
        captured.append((mod, inputs[0].detach(), output))

    hooks = [m.register_forward_hook(keep) for m in module.modules()
             if isinstance(m, SUPPORTED) and any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        losses = compute_losses()
    finally:
        for h in hooks:
            h.remove()
    if losses.shape != (n,):
        raise ValueError(f"expected per-example losses of shape ({n},), got {tuple(losses.shape)}")
    grads = torch.autograd.grad(losses.sum(), [out for _, _, out in captured], allow_unused=True)
    result: dict[str, torch.Tensor] = {}
    for (mod, a, _), g in zip(captured, grads):
        if g is None:
            continue
        for pname, gs in _per_example(mod, a, g, n).items():
            key = f"{names[mod]}.{pname}" if names[mod] else pname
            result[key] = result[key] + gs if key in result else gs  # a layer applied twice: gradients add up
    for name, p in params.items():
        if name not in result:  # unused in this forward (e.g. a branch not taken): zero per-example gradient
            result[name] = p.new_zeros((n, *p.shape))
    return result, losses.detach()
