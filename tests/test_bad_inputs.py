"""Bad input: a clear error that names the field, and the weights exactly as before."""
import functools

import pytest

import kedit_lite as ke
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

GOOD = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei")

BAD_REQUESTS = [
    (dict(GOOD, subject=""), "subject: empty"),
    (dict(GOOD, subject="   "), "subject: empty"),
    (dict(GOOD, subject=None), "subject: missing"),
    (dict(GOOD, subject=42), "subject: expected a string"),
    (dict(GOOD, subject=" The Space Needle"), "subject: .*whitespace"),
    (dict(GOOD, prompt="The tower is located in the city of"), "prompt: the subject .* does not occur"),
    (dict(GOOD, prompt=""), "prompt: empty"),
    (dict(GOOD, prompt="{} and {} are in"), "prompt: '{}' appears more than once"),
    (dict(GOOD, prompt="{} is located in the city of "), "prompt: ends with whitespace"),
    (dict(GOOD, prompt="x" * 3000 + " {}"), "prompt: 3003 characters"),
    (dict(GOOD, prompt=["{} is in"]), "prompt: expected a string"),
    (dict(GOOD, target_new=""), "target_new: empty"),
    (dict(GOOD, target_new="  "), "target_new: empty"),
    (dict(GOOD, target_new=None), "target_new: missing"),
    (dict(GOOD, target_new=" Taipei"), "target_new: .*whitespace"),
    (dict(GOOD, target_new="T" * 300), "target_new: 300 characters"),
    (dict(GOOD, target_true="taipei"), "target_new: equals target_true"),
    (dict(GOOD, target_true=3), "target_true: expected a string"),
    (dict(GOOD, prompt="{} is located in Taipei", target_new="Taipei"), "target_new: the prompt already ends"),
]


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny("llama")


@pytest.mark.parametrize("fields,message", BAD_REQUESTS)
def test_bad_request_clear_error_weights_unchanged(tiny_llama, tok, fields, message):
    saved = snapshot(tiny_llama)
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_llama, tok, fields, method="ft", layers=1)
    assert_same_weights(tiny_llama, saved)


BAD_CALLS = [
    (dict(method="nonsense"), "method: unknown method 'nonsense'"),
    (dict(method="ft", layers=3), "layers: layer 3 is out of range; this model has 3 layers"),
    (dict(method="ft", layers=-1), "layers: layer -1 is out of range"),
    (dict(method="ft", layers=[]), "layers: expected"),
    (dict(method="ft", layers="1"), "layers: expected an int"),
    (dict(method="ft", lr=-1.0), "lr: expected a positive"),
    (dict(method="ft", steps=0), "steps: expected a positive"),
    (dict(method="ft", norm_constraint=0), "norm_constraint: expected a positive"),
    (dict(method="ft", params="attention"), "params: expected"),
    (dict(method="ft", learning_rate=1e-3), r"hparams: unknown option\(s\) \['learning_rate'\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS)
def test_bad_call_clear_error_weights_unchanged(tiny_llama, tok, kwargs, message):
    saved = snapshot(tiny_llama)
    with pytest.raises((EditError, ValueError, TypeError), match=message):
        ke.edit(tiny_llama, tok, GOOD, **kwargs)
    assert_same_weights(tiny_llama, saved)


def test_bad_request_containers(tiny_llama, tok):
    saved = snapshot(tiny_llama)
    with pytest.raises(EditError, match="requests: empty list"):
        ke.edit(tiny_llama, tok, [], method="ft")
    with pytest.raises(EditError, match="request: expected"):
        ke.edit(tiny_llama, tok, "The Space Needle is in Taipei", method="ft")
    with pytest.raises(EditError, match=r"request: unknown field\(s\) \['target'\]"):
        ke.edit(tiny_llama, tok, dict(GOOD, target="x"), method="ft")
    assert_same_weights(tiny_llama, saved)


def test_failure_midway_restores_weights(tiny_llama, tok, monkeypatch):
    """An exception inside a method, after weights changed, still leaves them bit-identical."""
    from kedit_lite import ft
    saved = snapshot(tiny_llama)
    real_apply = ft.apply

    @functools.wraps(real_apply)
    def exploding_apply(*args, **kwargs):
        real_apply(*args, **kwargs)
        raise RuntimeError("boom after the weights moved")
    monkeypatch.setattr(ft, "apply", exploding_apply)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_llama, tok, GOOD, method="ft", layers=1, lr=1e-1, norm_constraint=None)
    assert_same_weights(tiny_llama, saved)


def test_nonfinite_edit_is_refused_and_restored(tiny_llama, tok, monkeypatch):
    """A method that leaves NaN in the weights (e.g. a diverging optimiser) is refused and rolled back."""
    from kedit_lite import ft
    saved = snapshot(tiny_llama)
    real_apply = ft.apply

    @functools.wraps(real_apply)
    def diverging_apply(model, tok, requests, cfg):
        out = real_apply(model, tok, requests, cfg)
        model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
        return out
    monkeypatch.setattr(ft, "apply", diverging_apply)
    with pytest.raises(EditError, match="non-finite"):
        ke.edit(tiny_llama, tok, GOOD, method="ft", layers=1, steps=2)
    assert_same_weights(tiny_llama, saved)
