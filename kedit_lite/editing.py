"""`edit()`: one entry point for every method, with validation, timing, memory, and exact undo (chapter 1).

A method is a module with a frozen `Config` dataclass (every hyperparameter and its default, checked once in
__post_init__) and two functions:
    touched_parameters(model, requests, cfg) -> [parameter names it will change]
    apply(model, tok, requests, cfg) -> dict with optional "context", "restore", "info"
"context" is text prepended to every query (IKE) or a callable prompt -> prefix deciding per query (SERAC).
`edit()` snapshots the touched parameters first, so a failed edit or `undo()` restores them bit for bit.
Undo order: each model keeps its live edits in order; `undo()` refuses (EditError, nothing changes) while a later
live edit changed some of the same weights, since restoring the snapshot would silently erase that edit too.
Edits on other weights, IKE contexts, T-Patcher patches, GRACE and CaliNET adaptors and SERAC memory entries
undo in any order.
"""
import importlib
import itertools
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import checks
from .requests import EditError, as_request_list

# method name -> module; each module is one algorithm, readable beside its chapter.
METHODS = {"ft": "kedit_lite.ft", "ike": "kedit_lite.ike", "rome": "kedit_lite.rome", "memit": "kedit_lite.memit",
           "mend": "kedit_lite.mend", "t-patcher": "kedit_lite.t_patcher"}
# Built and tested, and edit() runs them, but not yet in the course's benchmark files and chapters (table 5.2's
# other systems, in progress); they join METHODS when chapter 9 measures them.
PREVIEW = {"grace": "kedit_lite.grace", "calinet": "kedit_lite.calinet", "serac": "kedit_lite.serac",
           "kn": "kedit_lite.kn"}


def get_method(name):
    """The method module for `name`, with a clear error for unknown or not-yet-available methods."""
    if not isinstance(name, str):
        raise EditError(f"method: expected a method name (a string), got {type(name).__name__} {name!r}; choose one "
                        f"of {sorted(METHODS)}")
    key = name.lower().replace("_", "-")
    if key == "tpatcher":
        key = "t-patcher"
    modules = {**METHODS, **PREVIEW}
    if key not in modules:
        raise EditError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)} (or, not yet in the "
                        f"course's chapters, {sorted(PREVIEW)})")
    try:
        return importlib.import_module(modules[key])
    except ModuleNotFoundError as err:
        if err.name == modules[key]:
            raise EditError(f"method: {key!r} is not available in this version of kedit_lite yet") from err
        raise


def method_config(method, config=None, **hparams):
    """The method's frozen config: its defaults, then `config` (a Config of that method), then `hparams`."""
    return checks.config(get_method(method).Config, hparams, method, base=config)


def check_options(method, hparams):
    """Refuse an unknown method, option names it does not take, or a bad value, before any model is loaded."""
    method_config(method, **hparams)


def touched_parameters(model, requests, method="rome", config=None, **hparams):
    """The names of the weights `edit(model, tok, requests, method, **hparams)` would change (chapter 1)."""
    module, cfg = get_method(method), method_config(method, config, **hparams)
    return module.touched_parameters(model, as_request_list(requests), cfg)


class _PeakMemory:
    """Peak extra memory during a block: CUDA allocator stats on GPU, resident-set sampling on CPU."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss_mb():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        except OSError:
            return 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start, self._high, self._stop = self._rss_mb(), 0.0, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._high = max(self._high, self._rss_mb())
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._high, self._rss_mb()) - self.start
        return False


@dataclass
class EditResult:
    """What an edit did, with `undo()`; `context`: what queries get in front (IKE's text, SERAC's router), else ''."""
    method: str
    requests: list
    seconds: float
    peak_memory_mb: float
    touched: list
    context: object = ""      # a string, or a callable prompt -> prefix (see metrics.with_context)
    info: dict = field(default_factory=dict)
    config: object = None
    undone: bool = False
    _snapshot: dict = field(default=None, repr=False)
    _restore_extra: object = field(default=None, repr=False)
    _model: object = field(default=None, repr=False)
    _serial: int = field(default=0, repr=False)

    def undo(self):
        """Put this edit's weights back exactly as they were before it (bit-identical), patches removed."""
        if self.undone:
            raise RuntimeError("undo: this edit was already undone")
        _check_undo_order(self)
        _restore(self._model, self._snapshot)
        if self._restore_extra is not None:
            self._restore_extra()
        self.context, self.undone = "", True
        _forget(self)
        return self

    @property
    def adds_modules(self):
        """True when the edit added modules (T-Patcher's neurons, CaliNET's slots), which undo() removes."""
        return self._restore_extra is not None

    def saved_weights(self):
        """{name: the weight as it was before this edit} (the snapshot undo() restores; read-only copies)."""
        return {name: t.clone() for name, t in self._snapshot.items()}

    def evaluate(self, model, tok, case, **kwargs):
        """evaluate() with this edit's context (so IKE, SERAC and weight edits are scored the same way)."""
        from .metrics import evaluate
        return evaluate(model, tok, case, context=self.context, **kwargs)


@dataclass(frozen=True)
class _Live:
    """A model's record of one live edit: what it touched, and the result (a weak reference: results may be dropped)."""
    serial: int
    label: str
    touched: frozenset
    result: weakref.ref


_LIVE = weakref.WeakKeyDictionary()   # model -> [_Live], oldest first
_SERIALS = itertools.count(1)


def _label(result):
    first = f", {result.requests[0].subject!r} -> {result.requests[0].target_new!r}" if result.requests else ""
    more = f" +{len(result.requests) - 1} more" if len(result.requests) > 1 else ""
    return f"edit #{result._serial} ({result.method}{first}{more})"


def _remember(model, result):
    """Put `result` on top of the model's live edits; drop dropped results no earlier live edit could be blocked by."""
    result._serial = next(_SERIALS)
    live = _LIVE.setdefault(model, [])
    while live and live[0].result() is None:
        live.pop(0)
    live.append(_Live(result._serial, _label(result), frozenset(result.touched), weakref.ref(result)))
    return result


def _forget(result):
    live = _LIVE.get(result._model, [])
    live[:] = [e for e in live if e.serial != result._serial]


def _check_undo_order(result):
    """Refuse to undo while a later live edit changed some of the same weights (its change would be lost)."""
    live = _LIVE.get(result._model, [])
    mine = next((i for i, e in enumerate(live) if e.serial == result._serial), None)
    if mine is None:
        return
    later = [e for e in live[mine + 1:] if e.touched & live[mine].touched]
    if later:
        names = ", ".join(e.label + ("" if e.result() is not None else " (no longer referenced, so it can never be "
                                                                           "undone)") for e in reversed(later))
        raise EditError(f"undo: {live[mine].label} cannot be undone yet: later edits changed the same weights; "
                        f"undo them first, newest first: {names}")


@contextmanager
def _grads_kept(model):
    """Run with every weight frozen and without .grad; then give each back its requires_grad and .grad."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
        p.grad = None
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _snapshot(model, names):
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise EditError(f"layer: parameter(s) {missing} do not exist in this model")
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def _restore(model, snapshot):
    params = dict(model.named_parameters())
    for name, saved in snapshot.items():
        params[name].copy_(saved)


def edit(model, tok, requests, method="rome", config=None, **hparams):
    """Apply `method` to make the model give each request's target_new; returns an EditResult with undo().

    Options come as keywords (`lr=0.5`) or as the method's Config (`config=ke.rome.Config(lr=0.5)`), or both.
    """
    checks.model_and_tokenizer(model, tok)
    module = get_method(method)
    cfg = method_config(method, config, **hparams)
    reqs = as_request_list(requests)
    checks.no_conflicts(reqs)
    checks.fits_context(model, tok, reqs, getattr(module, "CONTEXT_MARGIN", checks.CONTEXT_MARGIN))
    if hasattr(module, "check_requests"):
        module.check_requests(model, tok, reqs, cfg)
    names = module.touched_parameters(model, reqs, cfg)
    snapshot = _snapshot(model, names)
    device = next(model.parameters()).device
    try:
        with _grads_kept(model), _PeakMemory(device) as mem:
            start = time.perf_counter()
            out = module.apply(model, tok, reqs, cfg) or {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        params = dict(model.named_parameters())
        bad = [n for n in names if not torch.isfinite(params[n]).all()]
        if bad:
            raise EditError(f"hparams: the edit produced non-finite weights in {bad}; lower the learning rate")
    except BaseException:
        _restore(model, snapshot)
        raise
    return _remember(model, EditResult(method=method, requests=reqs, seconds=seconds, peak_memory_mb=mem.peak_mb,
                                       touched=names, context=out.get("context", ""), info=out.get("info", {}),
                                       config=cfg, _snapshot=snapshot, _restore_extra=out.get("restore"),
                                       _model=model))


def edit_weights(model, names, update, method="manual", info=None):
    """Apply `update(params_by_name)` (in-place, no grad) to the named weights as an undoable EditResult.

    For edits that are not request-driven: deactivating neurons (chapter 8, right to be forgotten) or
    projecting a bias direction out of a layer (chapter 8, debiasing).
    """
    snapshot = _snapshot(model, list(names))
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    try:
        with _PeakMemory(device) as mem, torch.no_grad():
            start = time.perf_counter()
            update({n: params[n] for n in names})
            seconds = time.perf_counter() - start
    except BaseException:
        _restore(model, snapshot)
        raise
    return _remember(model, EditResult(method=method, requests=[], seconds=seconds, peak_memory_mb=mem.peak_mb,
                                       touched=list(names), info=info or {}, _snapshot=snapshot, _model=model))
