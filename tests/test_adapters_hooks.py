"""Adapters and hooks on tiny random models of every supported architecture (no download)."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, hooks
from tests.conftest import make_tiny


def test_adapter_paths_resolve(tiny):
    a = ke.get_adapter(tiny)
    assert adapters.num_layers(tiny) == 3
    for kind in ("attn", "mlp", "mlp_in", "mlp_out", "layer"):
        for layer in range(3):
            assert isinstance(adapters.layer_module(tiny, kind, layer), torch.nn.Module)
    for kind in ("embed", "final_norm", "lm_head"):
        assert isinstance(adapters.layer_module(tiny, kind), torch.nn.Module)
    d_model, d_mlp = adapters.mlp_dims(tiny)
    assert d_model == 32 and d_mlp in (64, 128)  # gpt2/gptj default to 4*d
    assert adapters.embedding_matrix(tiny).shape[1] == d_model
    assert a.gated == (tiny.config.model_type in ("llama", "qwen2", "mistral"))


def test_gpt2_conv1d_orientation():
    model = make_tiny("gpt2")
    w = adapters.layer_module(model, "mlp_out", 1).weight
    assert w.shape == (128, 32)  # Conv1D stores (in, out)
    assert adapters.as_out_in(model, w).shape == (32, 128)
    x = torch.randn(128)
    mlp_out = adapters.layer_module(model, "mlp_out", 1)
    expected = mlp_out(x[None, None])[0, 0] - mlp_out.bias
    assert torch.allclose(adapters.as_out_in(model, w) @ x, expected, atol=1e-5)


def test_hooks_record_input_is_mlp_out_key(tiny):
    """The recorded input of mlp_out times its (out, in) weight reproduces its output (the k -> v map)."""
    ids = torch.randint(0, 1000, (2, 7))
    name = adapters.module_name(tiny, "mlp_out", 1)
    with hooks.record(tiny, name, "input") as keys, hooks.record(tiny, name, "output") as vals:
        tiny(input_ids=ids)
    k, v = keys[name], vals[name]
    assert k.shape[:2] == (2, 7) and v.shape == (2, 7, 32)
    bias = getattr(adapters.layer_module(tiny, "mlp_out", 1), "bias", None)
    w = adapters.as_out_in(tiny, adapters.layer_module(tiny, "mlp_out", 1).weight)
    recon = k @ w.T + (bias if bias is not None else 0)
    assert torch.allclose(recon, v, atol=1e-5)


def test_add_at_changes_only_that_position(tiny):
    ids = torch.randint(0, 1000, (1, 6))
    layer = adapters.module_name(tiny, "layer", 2)
    with hooks.record(tiny, layer) as clean:
        tiny(input_ids=ids)
    delta = torch.ones(32)
    with hooks.add_at(tiny, adapters.module_name(tiny, "mlp", 0), 3, delta), hooks.record(tiny, layer) as patched:
        tiny(input_ids=ids)
    diff = (patched[layer] - clean[layer]).abs().amax(-1)[0]
    assert torch.all(diff[:3] < 1e-6), "positions before the patch cannot change (causal attention)"
    assert diff[3] > 1e-4


def test_set_at_and_hooks_are_removed(tiny):
    ids = torch.randint(0, 1000, (1, 5))
    ref = tiny(input_ids=ids).logits
    mlp = adapters.module_name(tiny, "mlp", 1)
    with hooks.set_at(tiny, mlp, [1, 2], torch.zeros(32)):
        changed = tiny(input_ids=ids).logits
    assert not torch.allclose(changed[0, 2], ref[0, 2])
    assert torch.equal(tiny(input_ids=ids).logits, ref), "hooks must be gone after the with-block"


def test_patch_bad_what(tiny):
    with pytest.raises(ValueError, match="what"):
        with hooks.patch(tiny, adapters.module_name(tiny, "mlp", 0), lambda x: x, what="middle"):
            pass


def test_unsupported_architecture_lists_supported():
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("opt", vocab_size=100, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                  num_attention_heads=2, word_embed_proj_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="not supported.*gpt2.*llama"):
        ke.get_adapter(model)


def test_layer_out_of_range_message(tiny):
    with pytest.raises(ValueError, match="out of range.*3 layers.*0 to 2"):
        adapters.layer_module(tiny, "mlp_out", 3)
    with pytest.raises(TypeError, match="integer"):
        adapters.layer_module(tiny, "mlp_out", "2")


def test_describe_smol(smol):
    info = ke.describe(smol[0])
    assert info["layers"] == 30 and info["d_model"] == 576 and info["d_mlp"] == 1536 and info["gated_mlp"]


def test_replay_returns_recorded_outputs_and_restores_forward(tiny):
    """replay(): the recorded block outputs stand in for the blocks, exactly; the modules work normally afterwards."""
    ids = torch.tensor([[5, 6, 7, 8]])
    blocks = [adapters.module_name(tiny, "layer", j) for j in range(2)]
    with hooks.record(tiny, blocks, whole=True) as recorded:
        reference = tiny(input_ids=ids).logits
    module = adapters.get_module(tiny, blocks[0])
    with hooks.replay(tiny, dict(recorded)):
        replayed = tiny(input_ids=ids).logits
        # a replayed block ignores its input: a different prompt changes only the blocks that still compute
        other = tiny(input_ids=torch.tensor([[9, 9, 9, 9]])).logits
    assert torch.equal(replayed, reference)
    assert not torch.equal(other, tiny(input_ids=torch.tensor([[9, 9, 9, 9]])).logits)
    assert "forward" not in module.__dict__                     # the class's forward is back
    assert torch.equal(tiny(input_ids=ids).logits, reference)

    # an instance-level forward (accelerate's device hooks install one) is put back, not deleted
    wrapped = module.forward
    module.forward = lambda *a, **k: wrapped(*a, **k)
    marker = module.forward
    with hooks.replay(tiny, {blocks[0]: recorded[blocks[0]]}):
        assert module.forward is not marker
    assert module.forward is marker
    del module.forward


def test_on_forward_reads_without_changing_and_removes_its_hooks(tiny):
    ids = torch.randint(0, 1000, (1, 5))
    name = adapters.module_name(tiny, "mlp_out", 0)
    before = tiny(input_ids=ids).logits
    seen = []
    with hooks.on_forward(tiny, [name], lambda n, x: seen.append((n, x.shape)) or 0, what="input"):
        during = tiny(input_ids=ids).logits     # the callback returns 0: nothing may be replaced
    assert seen and seen[0][0] == name and seen[0][1][-1] == adapters.mlp_dims(tiny)[1]
    assert torch.equal(before, during)
    assert not adapters.get_module(tiny, name)._forward_pre_hooks


def test_caches_are_weak_per_owner_and_cleared_at_once():
    import gc
    from kedit_lite import caches
    c = caches.Cache("test cache", maxsize=2)
    owner = torch.nn.Linear(2, 2)
    calls = []
    assert c.get("a", lambda: calls.append(1) or 1, owner) == 1
    assert c.get("a", lambda: calls.append(2) or 2, owner) == 1 and calls == [1]
    c.get("b", lambda: 2, owner), c.get("c", lambda: 3, owner)
    assert c.peek("a", owner) is None and c.peek("c", owner) == 3      # maxsize 2: the oldest went
    c.get("x", lambda: "shared")
    del owner
    gc.collect()
    assert len(c) == 1                                                  # the owner's entries left with it
    ke.clear_caches()
    assert len(c) == 0
