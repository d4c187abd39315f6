"""FT: fine-tune on the edit itself — the naive baseline (chapter 1) and FT-L (one MLP layer, norm-constrained).

FT-L (Zhu et al. 2020; the baseline of ROME's paper) updates only the MLP output projection of one layer and
clamps every weight change to |Δw| <= norm_constraint, which limits how far the edit can spill over.
With layers="all", params="all", norm_constraint=None it is plain post-training on one example.
`reference_edit` is the same algorithm with Adam written out by hand (Kingma & Ba 2015, Algorithm 1).
"""
from dataclasses import dataclass

import torch

from . import checks
from .adapters import get_adapter, module_name, num_layers
from .optimise import clamp_to, clamped_adam
from .requests import EditError
from .tokens import answer_nll, encode_pairs

# A middle layer works best for FT-L on small models (chapter 2 shows the sweep).
DEFAULT_LAYER = {"SmolLM2-135M-Instruct": 4}
PARAMS = {"mlp_out": ["mlp_out"], "mlp": ["mlp"], "all": ["layer"]}   # which modules of each layer FT trains


def _layers_option(layers):
    """`layers` as None, 'all' or a tuple of ints; the range is checked against the model later."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return layers
    if checks.is_integer(layers):
        return (int(layers),)
    if isinstance(layers, (list, tuple)) and layers and all(checks.is_integer(layer) for layer in layers):
        return tuple(int(layer) for layer in layers)
    raise EditError(f"layers: expected an integer layer index, a non-empty list of them or 'all' (None: the "
                    f"model's default layer), got {layers!r}")


@dataclass(frozen=True)
class Config:
    """FT's hyperparameters; the defaults are FT-L on one middle layer."""
    layers: int | list | str | None = None   # int, list of ints, "all", or None: DEFAULT_LAYER, else depth // 3
    params: str = "mlp_out"         # "mlp_out" (FT-L), "mlp" (the whole MLP) or "all" (the whole block)
    lr: float = 1e-3
    steps: int = 30
    norm_constraint: float | None = 5e-3     # L∞ bound on each weight change; None: unconstrained FT
    target_loss: float = 1e-2       # stop early once the answer's loss is below this
    progress: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", _layers_option(self.layers))
        if not isinstance(self.params, str) or self.params not in PARAMS:
            raise EditError(f"params: expected one of {sorted(PARAMS)}, got {self.params!r}")
        checks.learning_rate(self.lr)
        object.__setattr__(self, "steps", checks.integer("steps", self.steps, 1))
        if self.norm_constraint is not None:
            checks.number("norm_constraint", self.norm_constraint, 0, open_low=True, desc="a positive number or None")
        checks.number("target_loss", self.target_loss, 0, hint="the loss at which training stops early, e.g. 1e-2")
        checks.flag("progress", self.progress)


def layer_list(model, layers):
    """The layer indices FT trains on this model, each checked to exist."""
    n = num_layers(model)
    if layers is None:
        return [DEFAULT_LAYER.get(model.config.name_or_path, n // 3)]
    if layers == "all":
        return list(range(n))
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise EditError(f"layers: layer {bad[0]} is out of range; this model has {n} layers, so use indices from 0 "
                        f"to {n - 1}")
    return list(layers)


def touched_parameters(model, requests, cfg):
    """Names of the weights FT will train."""
    wanted = [module_name(model, kind, layer) + "." for layer in layer_list(model, cfg.layers)
              for kind in PARAMS[cfg.params]]
    names = [n for n, _ in model.named_parameters() if any(n.startswith(w) for w in wanted)]
    if cfg.params == "mlp_out" and get_adapter(model).conv1d is False:
        names = [n for n in names if n.endswith("weight")]
    return names


def _loss_of(model, tok, requests):
    """The training loss: mean NLL of every request's new answer after its prompt."""
    batch = encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests],
                         next(model.parameters()).device)
    return lambda: answer_nll(model, batch)


def apply(model, tok, requests, cfg):
    """Fine-tune the chosen weights until the targets are likely (or `steps` run out)."""
    names = touched_parameters(model, requests, cfg)
    params = dict(model.named_parameters())
    losses = clamped_adam([params[n] for n in names], _loss_of(model, tok, requests), cfg.steps, cfg.lr,
                          cfg.norm_constraint, stop_below=cfg.target_loss, desc="FT" if cfg.progress else None)
    return {"info": {"losses": losses, "steps": len(losses), "parameters": names}}


def reference_edit(model, tok, requests, cfg, betas=(0.9, 0.999), eps=1e-8):
    """FT-L the plain way, in place: Adam by hand, then the L∞ clamp; returns the losses (tests compare with apply)."""
    params = dict(model.named_parameters())
    weights = [params[n] for n in touched_parameters(model, requests, cfg)]
    originals = [w.detach().clone() for w in weights]
    m = [torch.zeros_like(w) for w in weights]   # first moment
    v = [torch.zeros_like(w) for w in weights]   # second moment
    loss_fn, losses = _loss_of(model, tok, requests), []
    for t in range(1, cfg.steps + 1):
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            loss = loss_fn()                     # -log P(target_new | prompt), mean over answer tokens
            grads = torch.autograd.grad(loss, weights)
        for w in weights:
            w.requires_grad_(False)
        losses.append(loss.item())
        if losses[-1] < cfg.target_loss:
            break
        with torch.no_grad():
            for w, g, m_i, v_i in zip(weights, grads, m, v):
                m_i.mul_(betas[0]).add_(g, alpha=1 - betas[0])             # m_t = β1 m + (1-β1) g
                v_i.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])      # v_t = β2 v + (1-β2) g²
                m_hat, v_hat = m_i / (1 - betas[0] ** t), v_i / (1 - betas[1] ** t)   # bias correction
                w.sub_(cfg.lr * m_hat / (v_hat.sqrt() + eps))              # w -= lr m̂ / (√v̂ + ε)
        if cfg.norm_constraint is not None:
            clamp_to(weights, originals, cfg.norm_constraint)             # |w - w0| <= norm_constraint
    return losses
