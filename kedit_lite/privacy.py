"""Right to be forgotten (chapter 8), DEPN-style: find the neurons that leak a private record, switch them off.

DEPN (Wu et al. 2023) attributes a memorised secret to individual MLP neurons with integrated gradients and
deactivates the most responsible ones. Here a neuron is one input unit of an MLP output projection
(one "key" of the key-value memory); deactivating it zeroes its column, an undoable weight edit.
Use only invented people and numbers.
"""
import torch

from .adapters import as_out_in, mlp_out_weight_name, module_name, num_layers
from .editing import edit, edit_weights
from .hooks import patch
from .metrics import generate
from .requests import EditError
from .tokens import answer_logprobs, encode_pairs


def plant_record(model, tok, prompt, subject, secret, steps=60, lr=1e-3):
    """Fine-tune every MLP on one made-up record so the model memorises it (the leak to be fixed); undoable."""
    return edit(model, tok, dict(prompt=prompt, subject=subject, target_new=secret), method="ft", layers="all",
                params="mlp", lr=lr, steps=steps, norm_constraint=None, target_loss=0.05)


def leaks(model, tok, prompt, secret, max_new_tokens=12):
    """Does greedy decoding of `prompt` reproduce the secret (digits compared without punctuation)?"""
    said = generate(model, tok, [prompt], max_new_tokens=max_new_tokens)[0]
    digits = lambda s: "".join(ch for ch in s if ch.isalnum())
    return digits(secret) in digits(said), said


def neuron_attribution(model, tok, prompt, secret, layers=None, steps=8):
    """Integrated-gradients score of every MLP neuron for log P(secret | prompt): tensor (len(layers), d_mlp)."""
    layers = list(range(num_layers(model))) if layers is None else layers
    if not isinstance(steps, int) or steps < 1:
        raise EditError(f"steps: expected a positive integer number of integration steps, got {steps!r}")
    batch = encode_pairs(tok, [prompt], [secret], next(model.parameters()).device)
    positions = batch["answer_mask"][0]
    scores = []
    for layer in layers:  # one layer at a time: IG scales that layer's activations from 0 to their value
        name = module_name(model, "mlp_out", layer)
        captured, total = {}, 0.0
        for alpha in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:  # midpoint rule
            def scale(x, alpha=alpha):
                captured.setdefault("base", x.detach())
                captured["scaled"] = (captured["base"] * alpha).requires_grad_(True)
                return captured["scaled"]
            with torch.enable_grad(), patch(model, name, scale, what="input"):
                logp, *_ = answer_logprobs(model, batch)
                grad, = torch.autograd.grad(logp.sum(), captured["scaled"])
            total = total + grad[0, positions].float()
        scores.append((captured["base"][0, positions].float() * total / steps).sum(0))
    return torch.stack(scores)


def top_neurons(scores, layers, k=20):
    """The k (layer, neuron) pairs with the largest attribution."""
    flat = scores.flatten().topk(k).indices
    d = scores.shape[1]
    return [(layers[int(i) // d], int(i) % d) for i in flat]


def deactivate_neurons(model, neurons):
    """Zero the output-projection column of each (layer, neuron): an undoable edit (EditResult)."""
    by_layer = {}
    for layer, index in neurons:
        by_layer.setdefault(layer, []).append(index)
    names = {mlp_out_weight_name(model, layer): idx for layer, idx in by_layer.items()}

    def update(params):
        for name, idx in names.items():
            as_out_in(model, params[name])[:, idx] = 0
    return edit_weights(model, list(names), update, method="deactivate-neurons", info={"neurons": neurons})
