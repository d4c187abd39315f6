"""kedit_lite: a small, readable model-editing library that backs the course "Model Editing, hands-on"."""
from .adapters import ADAPTERS, describe, get_adapter, layer_module, num_layers
from .data import lecture_case, load_cases, load_counterfact, load_lecture, load_zsre
from .editing import METHODS, EditResult, edit
from .metrics import evaluate, generate, summarize
from .models import DEFAULT_MODEL, load_model, pick_device
from .requests import EditCase, EditError, EditRequest, Probe

__version__ = "0.1.0"
__all__ = ["ADAPTERS", "DEFAULT_MODEL", "EditCase", "EditError", "EditRequest", "EditResult", "METHODS", "Probe",
           "describe", "edit", "evaluate", "generate", "get_adapter", "layer_module", "lecture_case", "load_cases",
           "load_counterfact", "load_lecture", "load_model", "load_zsre", "num_layers", "pick_device", "summarize"]

from . import course  # noqa: E402

# Chapter modules loaded on first use (they pull in heavier dependencies).
_LAZY = {"causal_trace": "kedit_lite.causal_trace", "suggest_layer": "kedit_lite.causal_trace",
         "widgets": "kedit_lite.widgets"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'kedit_lite' has no attribute {name!r}")
