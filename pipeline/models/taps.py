"""Features by module name, through forward hooks (the way the authors' methods read layers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class FeatureTaps:
    """Context manager recording the outputs of named submodules during forward passes.

    >>> with FeatureTaps(net, ["fc1"]) as taps:
    ...     logits = net(batch)
    ...     hidden = taps["fc1"]
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            known = ", ".join(name for name in modules if name)
            raise KeyError(f"{type(model).__name__} has no module named {', '.join(map(repr, missing))}; "
                           f"modules are: {known}")
        self._modules = {name: modules[name] for name in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FeatureTaps":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def _recorder(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
