"""Activation injection: the linear's input (forward pre-hook) and output (forward post-hook).

``input``: ``y = f(e(x))`` — the fake-quantized operand of a low-precision GEMM (W4A4 is weight + input).
``output``: ``y -> e(y)`` — error in the operator's own result (the verl fork's "HW error" mode).

Only the first tensor argument is injected (``args[0]``, or the ``input`` / ``x`` / ``hidden_states`` keyword for
modules called by keyword); other arguments (PEFT adapter names, vLLM extras) pass through untouched. For tuple
outputs only the first element is injected. Gradient semantics are those of `quarl.inject.errors.ErrorModel`:
straight-through with ``use_ste=True``, cut with ``use_ste=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inject = Callable[[torch.Tensor], torch.Tensor]
_INPUT_KWARGS = ("input", "x", "hidden_states")


def inject_input(args: tuple, kwargs: dict, inject: Inject) -> tuple[tuple, dict, torch.Tensor, torch.Tensor] | None:
    """Apply ``inject`` to the module's primary input.

    Returns:
        ``(args, kwargs, clean, injected)`` with the input replaced, or None when the call has no tensor input.
    """
    if args and isinstance(args[0], torch.Tensor):
        x = args[0]
        q = inject(x)
        return (q, *args[1:]), kwargs, x, q
    for name in _INPUT_KWARGS:
        if isinstance(kwargs.get(name), torch.Tensor):
            x = kwargs[name]
            q = inject(x)
            return args, {**kwargs, name: q}, x, q
    return None


def inject_output(output: Any, inject: Inject) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
    """Apply ``inject`` to the module's output (first element of a tuple output).

    Returns:
        ``(output, clean, injected)`` or None when there is no tensor output (e.g. the forward raised).
    """
    if isinstance(output, torch.Tensor):
        q = inject(output)
        return q, output, q
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        q = inject(output[0])
        return (q, *output[1:]), output[0], q
    return None
