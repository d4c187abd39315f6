"""Shared fixtures: the embedded SmolLM2 (loaded once), tiny random models of every supported family."""
import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("KEDIT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kedit"))

import kedit_lite as ke  # noqa: E402


@pytest.fixture(scope="session")
def smol():
    """(model, tok) for SmolLM2-135M-Instruct; tests must leave its weights as they found them."""
    return ke.load_model()


@pytest.fixture(autouse=True)
def _smol_restored(request):
    """Whatever a test does to the shared SmolLM2 (even failing before its undo), the next test gets it intact."""
    if "smol" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("smol")[0]
    saved = snapshot(model)
    yield
    if any(not torch.equal(v, saved[k]) for k, v in model.state_dict().items()):
        model.load_state_dict(saved)


@pytest.fixture(scope="session")
def tok(smol):
    return smol[1]


TINY_CONFIGS = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=2, n_positions=128),
    "gptj": dict(n_layer=3, n_embd=32, n_head=2, n_positions=128, rotary_dim=8),
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "llama": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64),
    "qwen2": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64),
    "mistral": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64),
}


def make_tiny(model_type, vocab_size=49152, seed=0):
    """A tiny random-weight causal LM of `model_type` (no download), sharing SmolLM2's vocabulary size."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request):
    return make_tiny(request.param)


def snapshot(model):
    """Exact copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, saved):
    """Every tensor bit-identical to `saved` (torch.equal, not allclose)."""
    now = model.state_dict()
    assert set(now) == set(saved)
    changed = [k for k in saved if not torch.equal(now[k], saved[k])]
    assert not changed, f"weights changed: {changed[:5]}"
