"""FT: fine-tune on the edit itself — the naive baseline (chapter 1) and FT-L (one MLP layer, norm-constrained).

FT-L (Zhu et al. 2020; the baseline of ROME's paper) updates only the MLP output projection of one layer and
clamps every weight change to |Δw| <= norm_constraint, which limits how far the edit can spill over.
With layers="all", params="all", norm_constraint=None it is plain post-training on one example.
"""
import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import check_layer, get_adapter, module_name, num_layers
from .requests import EditError
from .tokens import answer_nll, encode_pairs

# A middle layer works best for FT-L on small models (chapter 2 shows the sweep).
DEFAULT_LAYER = {"SmolLM2-135M-Instruct": 4}


def _layers(model, layers):
    if layers is None:
        layers = DEFAULT_LAYER.get(model.config.name_or_path, num_layers(model) // 3)
    if layers == "all":
        return list(range(num_layers(model)))
    if checks.is_integer(layers):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise EditError(f"layers: expected an int, a non-empty list of ints or 'all', got {layers!r}")
    try:
        return [check_layer(model, layer, "layers") for layer in layers]
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def touched_parameters(model, requests, layers=None, params="mlp_out", **_):
    """Names of the weights FT will train."""
    prefixes = {"mlp_out": ["mlp_out"], "mlp": ["mlp"], "all": ["layer"]}
    if params not in prefixes:
        raise EditError(f"params: expected 'mlp_out', 'mlp' or 'all', got {params!r}")
    wanted = [module_name(model, kind, layer) + "." for layer in _layers(model, layers) for kind in prefixes[params]]
    names = [n for n, _ in model.named_parameters() if any(n.startswith(w) for w in wanted)]
    if params == "mlp_out" and get_adapter(model).conv1d is False:
        names = [n for n in names if n.endswith("weight")]
    return names


def apply(model, tok, requests, layers=None, params="mlp_out", lr=1e-3, steps=30, norm_constraint=5e-3,
          target_loss=1e-2, progress=False):
    """Fine-tune the chosen weights until the targets are likely (or `steps` run out)."""
    checks.learning_rate(lr)
    steps = checks.integer("steps", steps, 1)
    if norm_constraint is not None:
        checks.number("norm_constraint", norm_constraint, 0, open_low=True, desc="a positive number or None")
    checks.number("target_loss", target_loss, 0, hint="the loss at which training stops early, e.g. 1e-2")
    checks.flag("progress", progress)
    names = touched_parameters(model, requests, layers, params)
    all_params = dict(model.named_parameters())
    weights = [all_params[n] for n in names]
    originals = [w.detach().clone() for w in weights]
    batch = encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests],
                         next(model.parameters()).device)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="FT", disable=not progress):
            optimizer.zero_grad()
            loss = answer_nll(model, batch)
            losses.append(loss.item())
            if loss.item() < target_loss:
                break
            loss.backward()
            optimizer.step()
            if norm_constraint is not None:
                with torch.no_grad():
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.clamp(w, w0 - norm_constraint, w0 + norm_constraint))
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    return {"info": {"losses": losses, "steps": len(losses), "parameters": names}}
