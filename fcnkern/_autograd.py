"""One autograd formula per forward op, run two ways: as the ``torch.library`` registration (what torch.compile
traces and ``torch.library.opcheck`` checks) and, in eager mode, through a ``torch.autograd.Function`` with the
same ``setup_context`` and ``backward``.

Why two: in eager mode torch.library's Python autograd layer (autograd_impl, the generated Function, argument
default filling, the redispatch) is per-call host time that the kernels do not need. On the 2-core CPU machine, on
inputs so small that the kernels take a few microseconds, the Function path cut a forward + backward call by 25-45
us per op (bench/call_overhead.py; bench/results/cpu-call-overhead-2026-11-26.md). On a GPU that host time is most
of a small call: the fused head measured a constant 0.5 ms on the H100 at batch 1. Under torch.compile the op itself
is called, so the graph holds one node per op as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_eager: dict[str, type[torch.autograd.Function]] = {}


def _op(name: str) -> torch._ops.OpOverload:
    namespace, op_name = name.split("::")
    return getattr(getattr(torch.ops, namespace), op_name).default


def register_autograd(name: str, backward: Callable[..., Any], setup_context: Callable[..., None]) -> None:
    """``torch.library.register_autograd(name, backward, setup_context=setup_context)``, plus the eager
    Function that :func:`call` uses for op ``name`` ("namespace::op")."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    op = _op(name)

    # The classic forward(ctx, ...) form: a Function with a separate setup_context binds its arguments through
    # inspect.signature on every call (~20 us).
    def forward(ctx: Any, *args: Any) -> Any:
        # Below the Autograd key: the kernel itself, without the registration's pass-through layer.
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        ctx.eager = True  # tells setup_context that no tracer will see its ctx (fcnkern/upsample_ce.py uses it)
        setup_context(ctx, args, output)
        return output

    _eager[name] = type(
        name.replace("::", "_") + "_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def call(name: str, *args: Any) -> Any:
    """Op ``name`` on ``args``, differentiable: the registered op while torch.compile traces, else the eager
    Function with the same formula."""
    if torch.compiler.is_compiling():
        return _op(name)(*args)
    return _eager[name].apply(*args)


def backward_call(op: Callable[..., Any], *args: Any) -> Any:
    """A backward op called from a backward formula. Below the Autograd key when autograd is not recording (the usual
    backward: its registration's pass-through layer is ~10 us of host time per call); through it when it is
    (create_graph=True), where the backward op's own registered derivative is needed."""
    if torch.is_grad_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
