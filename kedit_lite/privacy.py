"""Right to be forgotten (chapter 8), DEPN-style: find the neurons that leak a private record, switch them off.

DEPN (Wu et al. 2023) attributes a memorised secret to individual MLP neurons with integrated gradients (those
of Knowledge Neurons, attribution.py) and deactivates the most responsible ones. Here a neuron is one input unit
of an MLP output projection (one "key" of the key-value memory); deactivating it zeroes its column, an undoable
weight edit.
Use only invented people and numbers.
"""
from .adapters import as_out_in, mlp_out_weight_name, num_layers
from .attribution import alphas, answer_logprob, attribution
from .editing import edit, edit_weights
from .metrics import generate
from .tokens import encode_pairs


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
    """Integrated-gradients score of every MLP neuron for log P(secret | prompt): tensor (len(layers), d_mlp).

    Each layer's activations at every position are scaled from 0 to their value (midpoint rule), and the scores
    at the secret's positions summed (attribution.py, shared with Knowledge Neurons, chapter 5).
    """
    layers = list(range(num_layers(model))) if layers is None else layers
    alphas(steps)   # refuses a bad number of steps before any forward
    batch = encode_pairs(tok, [prompt], [secret], next(model.parameters()).device)
    positions = batch["answer_mask"][0]
    score = answer_logprob(positions, batch["labels"][0, positions])
    return attribution(model, batch["input_ids"], layers, score, steps=steps, attributed=positions.nonzero())


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
