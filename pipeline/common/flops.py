"""Counting the FLOPs a piece of torch code runs, autograd included:

    with FlopCount() as count:
        loss = objective.loss(...); loss.backward()
    count.flops

torch's FlopCounterMode tracks modules with hooks that `torch.autograd.grad` refuses ("a leaf node was passed to
_will_engine_execute_node"), and an energy's training step takes its gradient that way (double backward); this mode
keeps torch's per-operator formulas (`flop_registry`: matrix products and convolutions, forward and backward) and
drops the module tracking, so it counts any code.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """FLOPs of every operator run inside the block (its `flops`), by torch's own formulas."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
