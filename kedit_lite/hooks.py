"""Small context managers to read or patch a module's input or output.

The basis of causal tracing (chapter 4), ROME's k*/v* (chapter 5) and MEND's gradients (chapter 6).
A module's output may be a tensor or a tuple whose first item is the hidden state; both are handled.
"""
from contextlib import contextmanager

import torch

from .adapters import get_module


def first_tensor(x):
    """The hidden states of a module output: the tensor itself, or the first item of a tuple."""
    return x[0] if isinstance(x, tuple) else x


def replace_first_tensor(x, new):
    """The same output with its hidden states replaced by `new` (tuple outputs keep their other items)."""
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


def _resolve(model, module):
    return get_module(model, module) if isinstance(module, str) else module


def attach(model, module, fn, what="output", with_kwargs=False):
    """Register fn as a forward hook that stays until `handle.remove()`: for edits that live until undo (T-Patcher).

    what="output": fn(module, inputs, output[, kwargs]) -> new output or None; what="input": fn(module, inputs)
    -> new inputs or None. Everything temporary uses the context managers below, which always remove their hooks.
    """
    mod = _resolve(model, module)
    if what == "output":
        return mod.register_forward_hook(fn, with_kwargs=with_kwargs)
    if what == "input":
        return mod.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    raise ValueError(f"what: expected 'output' or 'input', got {what!r}")


@contextmanager
def on_forward(model, modules, fn, what="output"):
    """Call fn(name, tensor) with each module's output (or first input) on every forward inside the block.

    fn's return value is ignored: this is for reading (accumulating statistics, stopping a forward early);
    `patch` changes what a module returns.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    handles = []
    try:
        for name in names:
            def hook(module, inputs, *output, name=name):
                fn(name, first_tensor(output[0] if output else inputs))   # returns None: nothing is replaced
            handles.append(attach(model, name, hook, what))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(model, modules, what="output", detach=True, whole=False):
    """Record each module's output (or input) on every forward: yields {name: tensor} (last call wins).

    `whole=True` keeps a module's entire output (a tuple for some blocks), ready for `replay`.
    """
    if what not in ("output", "input"):
        raise ValueError(f"what: expected 'output' or 'input', got {what!r}")
    names = [modules] if isinstance(modules, str) else list(modules)
    store, handles = {}, []
    for name in names:
        mod = _resolve(model, name)

        def keep(tensor, name=name):
            store[name] = tensor.detach() if detach else tensor

        def keep_whole(out, name=name):
            store[name] = replace_first_tensor(out, first_tensor(out).detach()) if detach else out
        if what == "output" and whole:
            handles.append(mod.register_forward_hook(lambda m, i, o, keep=keep_whole: keep(o)))
        elif what == "output":
            handles.append(mod.register_forward_hook(lambda m, i, o, keep=keep: keep(first_tensor(o))))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, i, keep=keep: keep(first_tensor(i))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patch(model, module, fn, what="output"):
    """Replace a module's output (or first input) x by fn(x) on every forward inside the block."""
    mod = _resolve(model, module)
    if what == "output":
        handle = mod.register_forward_hook(lambda m, i, o: replace_first_tensor(o, fn(first_tensor(o))))
    elif what == "input":
        handle = mod.register_forward_pre_hook(lambda m, i: replace_first_tensor(i, fn(first_tensor(i))))
    else:
        raise ValueError(f"what: expected 'output' or 'input', got {what!r}")
    try:
        yield mod
    finally:
        handle.remove()


def _index(x, positions):
    """Rows/positions selector for a (batch, seq, d) tensor: one position per batch row, or a list for all."""
    if isinstance(positions, int):
        return (slice(None), positions)
    positions = torch.as_tensor(positions, device=x.device)
    if positions.dim() == 1 and positions.numel() == x.shape[0]:
        return (torch.arange(x.shape[0], device=x.device), positions)
    return (slice(None), positions)


@contextmanager
def add_at(model, module, positions, delta, what="output"):
    """Add `delta` (d,) to a module's output (or input) at token `positions` (an int, or one per batch row)."""
    def fn(x):
        x = x.clone()
        x[_index(x, positions)] += delta.to(x.dtype)
        return x
    with patch(model, module, fn, what):
        yield


@contextmanager
def set_at(model, module, positions, values, what="output"):
    """Overwrite a module's output (or input) at token `positions` with `values` (broadcast to the rows)."""
    def fn(x):
        x = x.clone()
        x[_index(x, positions)] = values.to(x.dtype)
        return x
    with patch(model, module, fn, what):
        yield


@contextmanager
def override_forward(modules_and_forwards):
    """Give modules another forward for the duration, then put back exactly what was there before.

    `modules_and_forwards`: [(module, make)], make(original_forward) -> new forward. An instance-level forward
    that was already there (accelerate's device hooks install one) is restored, not deleted.
    """
    saved = [(module, module.__dict__.get("forward")) for module, _ in modules_and_forwards]
    for module, make in modules_and_forwards:
        module.forward = make(module.forward)
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def replay(model, outputs):
    """Modules named in `outputs` skip their computation and return outputs[name] instead.

    For the part of a forward pass known in advance (the blocks below an edit, chapters 5 and 6): record
    them once with `record(..., whole=True)`, replay them at every step. A value may also be a function of
    no arguments that builds the output (e.g. the recorded one plus a vector being optimised).
    """
    def constant(value):
        return lambda original: (lambda *a, **k: value()) if callable(value) else (lambda *a, **k: value)
    with override_forward([(_resolve(model, name), constant(value)) for name, value in outputs.items()]):
        yield


@contextmanager
def inputs_and_output_grads(model, modules):
    """Yield {name: (input, zero)} for each module's last forward: its input, and a float32 zero added to its output.

    After `torch.autograd.grad(loss, zero)` that gradient is ∂loss/∂output (MEND's δ, chapter 6): adding a zero
    leaf makes the output differentiable without touching the (frozen) weights or changing the output.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    store, handles = {}, []

    def catcher(name):
        def hook(module, inputs, output):
            hidden = first_tensor(output)
            zero = torch.zeros_like(hidden, dtype=torch.float32, requires_grad=True)
            store[name] = (first_tensor(inputs).detach(), zero)
            return replace_first_tensor(output, hidden + zero.to(hidden.dtype))
        return hook
    try:
        for name in names:
            handles.append(_resolve(model, name).register_forward_hook(catcher(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


class _ForwardDone(Exception):
    """Raised inside a forward once every module `stop_after` waits for has run."""


@contextmanager
def stop_after(model, modules):
    """Within the block, a forward pass ends quietly once every module in `modules` has run (reading layer 5
    costs 6 layers, not 30); the block then carries on after the interrupted call."""
    pending = set([modules] if isinstance(modules, str) else modules)

    def done(name, _):
        pending.discard(name)
        if not pending:
            raise _ForwardDone
    try:
        with on_forward(model, sorted(pending), done):
            yield
    except _ForwardDone:
        pass
