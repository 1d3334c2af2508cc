"""One autograd formula per forward op, run two ways: as the ``torch.library`` registration (what torch.compile
traces and ``torch.library.opcheck`` checks) and, in eager mode, through a ``torch.autograd.Function`` with the
same ``setup_context`` and ``backward``.

Why two: in eager mode torch.library's Python autograd layer (autograd_impl, the generated Function, argument
default filling, the redispatch) is per-call host time that the kernels do not need. On the 2-core CPU machine, on
inputs so small that the kernels take a few microseconds, the Function path cut a forward + backward call by 25-45
us per op (bench/call_overhead.py; bench/results/cpu-call-overhead-2026-11-26.md). On a GPU that host time is most
of a small call: the fused head measured a constant 0.5 ms on the H100 at batch 1. Under torch.compile the op itself
is called, so the graph holds one node per op as before.

Below that layer, the kernels of the Triton backend are Python ``torch.library.custom_op`` functions, and calling
one through its op goes through the dispatcher, torch.library's Python kernel wrapper (output aliasing checks, a
torch._dynamo disable wrapper) and back into Python. In eager mode :func:`kernel` calls the function itself. That
layer was most of the Triton backend's host time on the H200 (bench/gpu_host_profile.py, run 14): cProfile charged
0.68-0.81 ms of own time per call to torch.library's ``backend_impl``, and a Triton op's forward + backward took
0.4-1.2 ms more host time than the same op's C++ kernels (which TORCH_LIBRARY registers, so they are called
directly). On this CPU machine the layer measured 11-13 us per call. The op itself is still called wherever
something may need to see it: a dispatch mode on the stack (FakeTensorMode, a TorchDispatchMode), a functorch
transform, the autograd profiler (which records the op's name), or a tensor subclass among the arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_eager: dict[str, type[torch.autograd.Function]] = {}

# op -> (its Python function, the positions of the tensors it mutates) for torch.library.custom_op ops; None for the
# rest (C++ ops, or a custom op with per-device kernels), which are always called as ops.
_python_kernels: dict[Any, tuple[Callable[..., Any], tuple[int, ...]] | None] = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _op(name: str) -> torch._ops.OpOverload:
    namespace, op_name = name.split("::")
    return getattr(getattr(torch.ops, namespace), op_name).default


def _python_kernel(op: Any) -> tuple[Callable[..., Any], tuple[int, ...]] | None:
    """(the function, mutated argument positions) behind a torch.library.custom_op op (its OpOverload or the
    CustomOpDef that the decorator returns), or None. Private torch.library attributes: where a PyTorch version
    lacks them, None, and the op is called as before."""
    try:
        return _python_kernels[op]
    except KeyError:
        pass
    found = None
    qualname = getattr(op, "_qualname", None) or getattr(op, "_name", None)
    opdef = torch._library.custom_ops.OPDEFS.get(qualname) if isinstance(qualname, str) else None
    backend_fns = getattr(opdef, "_backend_fns", None)
    fn = getattr(opdef, "_init_fn", None)
    single = isinstance(backend_fns, dict) and list(backend_fns) == [None]  # no per-device kernels
    if callable(fn) and single and not getattr(opdef, "_disabled_kernel", None):
        schema = opdef._opoverload._schema
        mutated = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
        found = (fn, mutated)
    _python_kernels[op] = found
    return found


def kernel(op: Any, *args: Any) -> Any:
    """op(*args) in eager mode, below the Autograd key: a torch.library.custom_op's own function called directly
    where nothing but the kernel would see the call (see the module docstring), else the op."""
    found = _python_kernel(op)
    if (
        found is None
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._profiler_enabled()
        or any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS for a in args)
    ):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    fn, mutated = found
    result = fn(*args)
    for i in mutated:  # what the op's ADInplaceOrView kernel does: autograd sees the in-place change
        torch.autograd.graph.increment_version(args[i])
    return result


def register_autograd(name: str, backward: Callable[..., Any], setup_context: Callable[..., None]) -> None:
    """``torch.library.register_autograd(name, backward, setup_context=setup_context)``, plus the eager
    Function that :func:`call` uses for op ``name`` ("namespace::op")."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    op = _op(name)

    # The classic forward(ctx, ...) form: a Function with a separate setup_context binds its arguments through
    # inspect.signature on every call (~20 us).
    def forward(ctx: Any, *args: Any) -> Any:
        # Below the Autograd key: the kernel itself, without the registration's pass-through layer.
        output = kernel(op, *args)
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
    backward: its registration's pass-through layer is ~10 us of host time per call; see :func:`kernel`); through it
    when it is (create_graph=True), where the backward op's own registered derivative is needed."""
    if torch.is_grad_enabled():
        return op(*args)
    return kernel(op, *args)
