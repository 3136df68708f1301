"""What Opacus's wrapping changes about a model, known here and nowhere else.

``make_private`` wraps the model in a ``GradSampleModule``: its state-dict keys gain a
``_module.`` prefix (once per wrapping) and the plain model's own attributes are hidden behind
it. Only the plain model's weights may cross a process or disk boundary, and the training loop
and objectives must see the plain model's attributes whether or not it is wrapped.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

_PREFIX = "_module."
#: attributes of the plain model that the training loop and the objectives read
MODEL_ATTRIBUTES = ("num_classes", "latent_shape")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside any number of Opacus wrappers."""
    while hasattr(model, "_module") and isinstance(getattr(model, "_module"), nn.Module):
        model = model._module
    return model


def unwrap_key(key: str) -> str:
    """``_module.a.b`` (possibly nested) -> ``a.b``."""
    while key.startswith(_PREFIX):
        key = key[len(_PREFIX):]
    return key


def unwrap_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with keys that match a freshly built model."""
    return {unwrap_key(k): v for k, v in state.items()}


def expose_attributes(wrapper: nn.Module, model: nn.Module) -> nn.Module:
    """Let ``wrapper`` answer :data:`MODEL_ATTRIBUTES` as ``model`` does; returns ``wrapper``."""
    for name in MODEL_ATTRIBUTES:
        if hasattr(model, name):
            object.__setattr__(wrapper, name, getattr(model, name))
    return wrapper
