"""The ``torch.optim.Optimizer`` surface of a wrapper, proxied to the optimizer it wraps.

``param_groups``, ``state`` and ``defaults`` are the inner optimizer's (nothing goes stale after
``load_state_dict``, and schedulers that write the lr write the reference values), torch's hook registries exist so
its public hook methods keep working, and pickling keeps the wrapper's own attributes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class InnerOptimizerProxy(torch.optim.Optimizer):
    """Base of an optimizer that wraps ``self.optimizer`` (set by the subclass); call :meth:`_init_torch_hooks` in
    ``__init__`` (torch.optim.Optimizer.__init__ is not called: it would copy the param groups)."""

    optimizer: torch.optim.Optimizer

    def _init_torch_hooks(self) -> None:
        """torch.optim.Optimizer's hook registries, so its public hook methods keep working."""
        self._optimizer_step_pre_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._optimizer_step_post_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._optimizer_state_dict_pre_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._optimizer_state_dict_post_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: "OrderedDict[int, Callable]" = OrderedDict()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict:  # torch.optim.Optimizer's would drop the wrapper's own attributes
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def _opt_called(self) -> bool:  # read by torch schedulers re-pointed at the wrapper (see sdebatch.lightning)
        return getattr(self.optimizer, "_opt_called", False)

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self.optimizer._opt_called = value

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)


class Handle:
    _next_id = 0

    def __init__(self, registry: "OrderedDict[int, Callable]", hook: Callable) -> None:
        self.registry, self.id = registry, Handle._next_id
        Handle._next_id += 1
        registry[self.id] = hook

    def remove(self) -> None:
        self.registry.pop(self.id, None)
