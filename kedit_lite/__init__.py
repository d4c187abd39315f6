"""kedit_lite: a small, readable model-editing library that backs the course "Model Editing, hands-on"."""
from .adapters import ADAPTERS, describe, get_adapter, layer_module, num_layers
from .caches import clear_caches
from .data import course_fact, lecture_case, load_cases, load_counterfact, load_course_facts, load_lecture, load_zsre
from .editing import METHODS, EditResult, edit
from .metrics import evaluate, generate, score_edit, summarize
from .models import DEFAULT_MODEL, load_model, pick_device
from .requests import EditCase, EditError, EditRequest, Probe

__version__ = "0.1.0"
__all__ = ["ADAPTERS", "clear_caches", "course_fact", "DEFAULT_MODEL", "describe", "edit", "EditCase", "EditError", "EditRequest",
           "EditResult", "evaluate", "generate", "get_adapter", "layer_module", "lecture_case", "load_cases",
           "load_counterfact", "load_course_facts", "load_lecture", "load_model", "load_zsre", "METHODS",
           "num_layers", "pick_device", "Probe", "score_edit", "summarize"]

from . import course  # noqa: E402

# Chapter modules loaded on first use (they pull in heavier dependencies).
# name -> (module, attribute or None for the module itself)
_LAZY = {"causal_trace": ("kedit_lite.tracing", "causal_trace"),
         "suggest_layer": ("kedit_lite.tracing", "suggest_layer"),
         "widgets": ("kedit_lite.widgets", None), "edit_lab": ("kedit_lite.widgets", "edit_lab"),
         "quiz": ("kedit_lite.quiz", None)}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'kedit_lite' has no attribute {name!r}")
