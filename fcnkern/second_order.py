"""Second-order gradients (double backward) of the fused ops.

The kernels compute first-order gradients. When a first-order gradient is itself differentiated (a gradient
penalty, a Hessian-vector product: ``torch.autograd.grad(..., create_graph=True)`` then backward again), autograd
needs the backward ops' own derivatives. Without them PyTorch warns and treats a C++ backward op as constant,
which gave silently zero second-order gradients. So each backward op gets one:

- conv + ReLU and learned upsampling: :func:`register_reference_double_backward` recomputes the backward op's
  result with PyTorch's own ops under autograd and differentiates that. Exact (the ReLU mask is piecewise constant,
  so its derivative is zero almost everywhere, as in PyTorch), at PyTorch's speed; the first-order gradients still
  come from the kernels.
- bilinear upsampling: its backward is linear in the gradient with the forward as its adjoint, so the backward op's
  derivative is the forward kernel itself (registered in :mod:`fcnkern.upsample`).
- the cross-entropies (the fused head too) compute their gradient in the forward sweep or from saved statistics,
  neither of which autograd can differentiate. Under create_graph=True their backward computes the logits' gradient
  with PyTorch's formula instead (:func:`differentiable_grad`), which autograd can differentiate again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def register_reference_double_backward(bwd_name: str, reference: Callable[..., tuple[Tensor, ...]]) -> None:
    """Registers the derivative of backward op ``bwd_name`` (any schema returning a tuple of tensors) as that of
    ``reference``: the same maths in differentiable PyTorch ops, called with the op's arguments, its floating-point
    tensors as fresh leaves that require grad. ``reference`` returns every output in full; those the op left
    zero-size (not asked for) are skipped."""

    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, Tensor) for a in inputs]
        ctx.others = [None if is_t else a for a, is_t in zip(inputs, ctx.is_tensor, strict=True)]
        ctx.save_for_backward(*[a for a, is_t in zip(inputs, ctx.is_tensor, strict=True) if is_t])

    def backward(ctx, *out_grads):
        higher = torch.is_grad_enabled()  # create_graph of this backward: keep the graph for a third order
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if is_t else other for is_t, other in zip(ctx.is_tensor, ctx.others, strict=True)]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
        result: list[Tensor | None] = [None] * len(args)
        with torch.enable_grad():
            leaves = [
                a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args
            ]
            outs = reference(*leaves)
            # A zero-size gradient belongs to an output the backward op was not asked for (or an empty one): it
            # contributes nothing, so the reference may return every output whatever the op's output_mask.
            pairs = [(o, g) for o, g in zip(outs, out_grads, strict=True)
                     if g is not None and g.numel() > 0 and o.requires_grad]  # fmt: skip
            if not pairs or not wanted:
                return tuple(result)
            grads = torch.autograd.grad(
                [o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                allow_unused=True, create_graph=higher,
            )  # fmt: skip
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(bwd_name, backward, setup_context=setup_context)


def differentiable_grad(loss_fn: Callable[[Tensor], Tensor], inputs: Tensor, grad_loss: Tensor) -> Tensor:
    """d<loss_fn(inputs), grad_loss>/d inputs by PyTorch's autograd over ``loss_fn`` (PyTorch ops), with the graph
    kept: what a loss op's backward returns under create_graph=True. ``inputs`` is the op's saved input itself, so
    the second backward flows on to whatever produced it."""
    with torch.enable_grad():
        loss = loss_fn(inputs)
        (grad,) = torch.autograd.grad(loss, inputs, grad_loss.to(loss.dtype), create_graph=True)
    return grad
