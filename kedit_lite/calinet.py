"""CaliNET (Dong et al. 2022): fix facts with calibration memory slots beside an FFN, base weights frozen (chapter 7).

The textbook (§5.2, 附加参数法, beside T-Patcher) reads an FFN as a key–value memory, FFN(H) = act(H·Kᵀ)·V. CaliNET
gives chosen FFNs n_slots more slots, FFN'(H) = FFN(H) + act(H·K_cᵀ)·V_c with K_c, V_c of shape (n_slots, d), and
trains only K_c and V_c: cross-entropy of the right answer after the fact's prompts, no retention term (the paper has
none, so locality is whatever the slots leave alone; the bench measures it). All requests of one edit share one set.
The paper: 64 slots in the last FFN (of T5's decoder), the FFN's activation, random nn.Linear init, constant lr 1e-2,
each fact in several ParaRel paraphrases. Decoder-only here: the slots read the MLP's input and add to its output in a
forward hook (undo removes it); act is the model's FFN activation, ungated even on gated (Llama) MLPs as in the
paper's formula; Adam instead of Adafactor, stopping at `target_loss`. A request carries one template, so the
paraphrases are the prompt in contexts the model writes itself (ROME's context templates) plus any `templates`.
`reference_edit` is the algorithm in plain code; `apply` is the same maths, fast: the blocks below the first
calibrated layer cannot change, so they run once and each step runs only the rest (as in t_patcher).
"""
import math
import weakref
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from . import checks
from .adapters import check_layer, mlp_dims, module_name, num_layers
from .forward import split_below
from .hooks import attach, first_tensor, patch as patched_output, record, replace_first_tensor
from .keys_values import context_prefixes
from .optimise import clamped_adam
from .requests import EditError, as_request_list
from .t_patcher import answer_logits
from .tokens import encode_pairs

# model -> [CalibrationSlots] currently installed, oldest first. Not a cache: the live slots undo() removes.
_INSTALLED = weakref.WeakKeyDictionary()


def _check_templates(templates):
    """A tuple of wordings, each a visible string with exactly one '{}' for the subject."""
    if not isinstance(templates, (list, tuple)):
        raise EditError(f"templates: expected a list of wordings with '{{}}' for the subject, got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1 or not t.replace("{}", "").strip() or t != t.rstrip():
            raise EditError(f"templates: {t!r} is not a wording with exactly one '{{}}' for the subject and no "
                            "trailing whitespace, e.g. '{} can be found in the city of'")
    return tuple(templates)


def _check_layers(layers):
    """None, one layer index, or a non-empty list of distinct indices, as a sorted tuple."""
    if layers is None:
        return None
    if checks.is_integer(layers):
        layers = [layers]
    if (not isinstance(layers, (list, tuple)) or not layers or not all(checks.is_integer(x) for x in layers)
            or len(set(layers)) != len(layers)):
        raise EditError(f"layers: expected a layer index or a list of distinct ones (None: the last block), "
                        f"got {layers!r}")
    return tuple(sorted(int(x) for x in layers))


@dataclass(frozen=True)
class Config:
    """CaliNET's options: where the slots go, how many, and how they train (the paper's defaults, see above)."""
    layers: tuple | None = None    # the calibrated FFNs; None: the last block (the paper's choice)
    n_slots: int = 64              # d_c: slots per calibrated FFN (the paper's 64)
    steps: int = 100               # Adam steps at most
    lr: float = 1e-2               # the paper's constant learning rate
    target_loss: float = 1e-2      # stop once the mean answer loss is below this
    n_prefixes: int = 4            # contexts the model writes for each prompt (our stand-in for ParaRel paraphrases)
    templates: tuple = ()          # more wordings ('{}' = subject) for every request: the paper's paraphrases
    seed: int = 0                  # the slots' random initialisation
    progress: bool = False         # show a progress bar

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers))
        checks.integer("n_slots", self.n_slots, 1)
        checks.integer("steps", self.steps, 1)
        checks.learning_rate(self.lr)
        checks.number("target_loss", self.target_loss, 0, desc="a finite number >= 0")
        checks.integer("n_prefixes", self.n_prefixes, 0)
        object.__setattr__(self, "templates", _check_templates(self.templates))
        checks.integer("seed", self.seed, 0)
        checks.flag("progress", self.progress)


def ffn_activation(model):
    """The activation of the model's FFNs (GELU for GPT-2, SiLU for Llama), as a module."""
    name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation_function", None)
    if name not in ACT2FN:
        raise EditError(f"model: unknown FFN activation {name!r}; CaliNET uses the FFN's own activation")
    return ACT2FN[name]


class CalibrationSlots(torch.nn.Module):
    """n_slots calibration memory slots at one FFN (chapter 7): keys K_c (n, d), values V_c (n, d), act(q·K_cᵀ)·V_c."""

    def __init__(self, d, n_slots, layer, act, generator=None):
        super().__init__()
        self.layer, self.act, self.handle = layer, act, None
        # nn.Linear's default init, as the published code's extra Linear layers get: U(±1/sqrt(fan_in))
        key = (torch.rand(n_slots, d, generator=generator) * 2 - 1) / math.sqrt(d)
        value = (torch.rand(n_slots, d, generator=generator) * 2 - 1) / math.sqrt(n_slots)
        self.key, self.value = torch.nn.Parameter(key), torch.nn.Parameter(value)

    def activation(self, q):
        """act(q·K_cᵀ): how much each slot fires on each FFN input, in float32: (..., n_slots)."""
        return self.act(q.float() @ self.key.float().T)

    def forward(self, q):
        """The slots' contribution act(q·K_cᵀ)·V_c to the FFN output (float32)."""
        return self.activation(q) @ self.value.float()

    def n_parameters(self):
        """Parameters these slots add to the model (keys and values)."""
        return sum(p.numel() for p in self.parameters())


def resolve_layers(model, layers):
    """The calibrated layers: the last block by default (the paper's choice), else `layers` checked on the model."""
    if layers is None:
        return (num_layers(model) - 1,)
    try:
        return tuple(check_layer(model, layer, "layers") for layer in layers)
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def new_slots(model, layers, cfg):
    """Fresh slots for each layer, drawn from `cfg.seed` (on the CPU, so every device starts from the same ones)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    d_model, _ = mlp_dims(model)
    device = next(model.parameters()).device
    return [CalibrationSlots(d_model, cfg.n_slots, layer, ffn_activation(model), generator).to(device)
            for layer in layers]


def calibration_batch(model, tok, requests, cfg):
    """The calibration data: each request's prompt and `templates`, bare and after each context prefix, + answers."""
    prefixes = context_prefixes(model, tok, cfg.n_prefixes)
    prompts, answers = [], []
    for r in requests:
        for wording in [r.prompt_text] + [t.replace("{}", r.subject) for t in cfg.templates]:
            for prefix in prefixes:
                prompts.append(f"{prefix}. {wording}" if prefix else wording)
                answers.append(r.target_new)
    return encode_pairs(tok, prompts, answers, next(model.parameters()).device)


def touched_parameters(model, requests, cfg):
    """CaliNET changes no base weight: it adds calibration slots (checks the layers against the model)."""
    resolve_layers(model, cfg.layers)
    return []


def _install(model, slots):
    """Add the slots' output to the MLP's output on every forward (a hook; the base weights stay as they are)."""
    def add_slots(module, args, kwargs, output):
        hidden = first_tensor(output)
        q = args[0] if args else next(iter(kwargs.values()))
        return replace_first_tensor(output, hidden + slots(q).to(hidden.dtype))
    slots.handle = attach(model, module_name(model, "mlp", slots.layer), add_slots, with_kwargs=True)
    _INSTALLED.setdefault(model, []).append(slots)


def _remove(model, slots):
    """Take one set of slots out of the model (undo)."""
    if slots.handle is not None:
        slots.handle.remove()
        slots.handle = None
    live = _INSTALLED.get(model, [])
    live[:] = [s for s in live if s is not slots]


def installed(model):
    """The calibration slots currently in `model`, oldest first (one entry per calibrated layer per edit)."""
    return list(_INSTALLED.get(model, []))


def parameters_added(model):
    """Total number of parameters all installed calibration slots add."""
    return sum(s.n_parameters() for s in installed(model))


def remove_all(model):
    """Remove every calibration slot from `model` (for notebooks that lost their EditResults)."""
    for slots in installed(model):
        _remove(model, slots)


def _train(slots, loss, cfg):
    """Adam on the slots alone (the base model is frozen), until the loss is below target_loss or cfg.steps."""
    params = [p for s in slots for p in s.parameters()]
    return clamped_adam(params, loss, cfg.steps, cfg.lr, stop_below=cfg.target_loss,
                        desc="CaliNET" if cfg.progress else None)


def _finish(slots, dtype):
    """Freeze the trained slots in the model's dtype (their maths stay float32); refuse non-finite ones."""
    for s in slots:
        s.requires_grad_(False)
        s.to(dtype)
        if not all(torch.isfinite(p).all() for p in s.parameters()):
            raise EditError("lr: the calibration slots became non-finite; lower lr")


def reference_edit(model, tok, requests, cfg=Config()):
    """CaliNET in plain code (full forwards and logits; only the prefixes cached): the slots (not installed), losses."""
    requests = as_request_list(requests)
    batch = calibration_batch(model, tok, requests, cfg)
    slots = new_slots(model, resolve_layers(model, cfg.layers), cfg)

    def loss():
        with ExitStack() as stack:
            for s in slots:                                          # FFN'(H) = FFN(H) + act(H·K_cᵀ)·V_c
                mlp = module_name(model, "mlp", s.layer)
                h = stack.enter_context(record(model, mlp, what="input", detach=False))
                stack.enter_context(patched_output(model, mlp, lambda out, s=s, h=h, mlp=mlp:
                                                   out + s(h[mlp]).to(out.dtype)))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                 ignore_index=-100)
    losses = _train(slots, loss, cfg)
    _finish(slots, next(model.parameters()).dtype)
    return slots, losses


def apply(model, tok, requests, cfg):
    """Add `n_slots` trained calibration memory slots to each chosen FFN; returns restore (removes them) and info."""
    layers = resolve_layers(model, cfg.layers)
    batch = calibration_batch(model, tok, requests, cfg)
    _, fixed = split_below(model, batch, layers[0])                  # the blocks below the slots, run once
    labels = batch["labels"][batch["answer_mask"]]
    slots = new_slots(model, layers, cfg)
    for s in slots:
        _install(model, s)

    def loss():
        return torch.nn.functional.cross_entropy(answer_logits(model, batch, fixed).float(), labels)
    try:
        losses = _train(slots, loss, cfg)
        _finish(slots, next(model.parameters()).dtype)
        with torch.no_grad():
            final = loss().item()                                    # the installed, frozen slots' loss
    except BaseException:
        for s in slots:
            _remove(model, s)
        raise
    info = {"layers": list(layers), "slots": slots, "n_slots": cfg.n_slots,
            "parameters_added": sum(s.n_parameters() for s in slots), "final_loss": final, "losses": losses,
            "steps": len(losses), "n_prompts": len(batch["input_ids"])}
    return {"restore": lambda: [_remove(model, s) for s in slots], "info": info}
