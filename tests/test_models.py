import pytest
import torch

from smolcluster import checkpoint
from smolcluster.errors import ConfigError
from smolcluster.flat import FlatParams
from smolcluster.models import build_model, fingerprint


def cfg(**kw):
    return dict(kw)


def test_mlp_adapts_to_input_size():
    m8 = build_model(cfg(name="mlp", kind="classifier", _target_="smolcluster.models.mlp.MLP", hidden=[128, 64]),
                     {"in_features": 64, "num_classes": 10})
    m28 = build_model(cfg(name="mlp", kind="classifier", _target_="smolcluster.models.mlp.MLP", hidden=[128, 64]),
                      {"in_features": 784, "num_classes": 10})
    assert m8(torch.zeros(3, 64)).shape == (3, 10)
    assert m28.net[1].weight.shape == (128, 784)
    assert fingerprint(m8) != fingerprint(m28)


def test_custom_module_by_target_gets_only_the_arguments_it_takes():
    m = build_model(cfg(name="tiny", kind="classifier", _target_="tests.custom_models.TinyNet", width=7),
                    {"in_features": 64, "num_classes": 10, "vocab_size": 99})
    assert m.body[0].weight.shape == (7, 64)


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="model._target_=.*cannot be imported"):
        build_model(cfg(name="x", kind="classifier", _target_="nope.Missing"), {})


def test_gpt2_tiny_is_a_hf_gpt2_with_seeded_init():
    spec = cfg(name="gpt2-tiny", kind="lm", _target_="smolcluster.models.gpt2.build_gpt2", n_layer=2, n_head=2,
               n_embd=32, n_positions=16, block_size=8, dropout=0.0, pretrained=None)
    torch.manual_seed(0)
    a = build_model(spec, {"vocab_size": 100})
    torch.manual_seed(0)
    b = build_model(spec, {"vocab_size": 100})
    assert type(a).__name__ == "GPT2LMHeadModel"
    assert a(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 100)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_pretrained_weights_name_the_path(tmp_path):
    spec = cfg(name="gpt2", kind="lm", _target_="smolcluster.models.gpt2.build_gpt2", pretrained=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="model.pretrained=.*no GPT-2 weights"):
        build_model(spec, {"vocab_size": 100})


def test_flat_params_are_views_and_grads_accumulate_in_place():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in m.parameters()]
    flat = FlatParams(m)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    m(torch.randn(5, 4)).pow(2).sum().backward()
    g = flat.grads["float32"]
    assert g.abs().sum() > 0
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in m.parameters()]), g)
    flat.params["float32"].add_(1.0)  # writing the flat buffer writes the module's parameters
    assert torch.allclose(m[0].bias, before[1] + 1.0)


def test_checkpoint_roundtrip_with_adamw_state(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 4)).sum().backward()
        opt.step()
    checkpoint.save(tmp_path, m, opt, step=3)
    m2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    meta = checkpoint.load(tmp_path, m2, opt2)
    assert meta["step"] == 3
    assert torch.equal(m.weight, m2.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"]) and float(s1["step"]) == float(s2["step"]) == 3
    with pytest.raises(ConfigError, match="no checkpoint.safetensors"):
        checkpoint.load(tmp_path / "empty", m2)
