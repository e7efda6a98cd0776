"""optim.FlatOptimizer against torch.optim: the same numbers, bit for bit, and torch's saved state read back."""

from __future__ import annotations

import copy

import pytest
import torch

from smolcluster.optim import adamw, set_lr, sgd

CASES = {  # name: (ours, torch's), with weight decay, momentum variants and AdamW's betas as a run sets them
    "sgd": (lambda ps: sgd(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd momentum wd": (lambda ps: sgd(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
                        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd nesterov": (lambda ps: sgd(ps, lr=0.7, momentum=0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)),
    "adamw": (lambda ps: adamw(ps, lr=3e-3, betas=[0.9, 0.95], weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
}


def _params(dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1000, generator=g).to(dtype), torch.randn(37, generator=g).to(dtype)]


def _steps(opt, params, first: int, last: int) -> None:
    """Steps ``first..last-1``: the gradient of step s is a fixed function of s, and the lr changes every step."""
    for s in range(first, last):
        g = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        set_lr(opt, opt.param_groups[0]["lr"] * 0.9)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_equal_torch_optim_bit_for_bit_and_resume_from_torchs_saved_state(case, dtype):
    ours_f, torch_f = CASES[case]
    mine, ref = _params(dtype), _params(dtype)
    ours, theirs = ours_f(mine), torch_f(ref)
    _steps(ours, mine, 0, 5)
    _steps(theirs, ref, 0, 5)
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()

    # torch's saved state (a checkpoint written before optim.FlatOptimizer) resumes here and steps on identically
    mine2 = [p.clone() for p in ref]
    ours2 = ours_f(mine2)
    ours2.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as read back from a checkpoint file
    assert ours2.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] != ours_f(_params(dtype)).param_groups[0]["lr"]
    _steps(ours2, mine2, 5, 8)
    _steps(theirs, ref, 5, 8)
    assert all(torch.equal(a, b) for a, b in zip(mine2, ref))


def test_a_state_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="groups of sizes"):
        sgd(_params(torch.float32), lr=0.1).load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})


@pytest.mark.parametrize(("override", "expect"), [
    ("train.momentum=-0.5", r"^train\.momentum=-0\.5 is invalid: it must be a non-negative number"),
    ("train.betas=[0.9,1.0]", r"^train\.betas=\[0\.9, 1\.0\] is invalid: give AdamW's two decay rates, each in \[0, 1\)"),
    ("train.betas=[-0.1,0.9]", r"^train\.betas=\[-0\.1, 0\.9\] is invalid"),
    ("train.betas=[0.9,0.95,0.99]", r"^train\.betas=\[0\.9, 0\.95, 0\.99\] is invalid"),
])
def test_optimizer_values_torch_refuses_are_refused_naming_the_key(override, expect):
    from hydra import compose, initialize_config_dir

    from smolcluster.config import validate
    from smolcluster.errors import ConfigError
    from smolcluster.paths import CONFIG_DIR
    from smolcluster.train_settings import train_config

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["algo=local", override])
    with pytest.raises(ConfigError, match=expect):
        validate(train_config(cfg))


def test_sgd_and_adamw_refuse_what_torch_optim_refuses():
    """As torch.optim.SGD / AdamW do: the callers that build them without validate() (diloco's outer step)."""
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.SGD(p, lr=0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        sgd(p, lr=0.1, momentum=-0.1)
    for betas in ((0.9, 1.0), (-0.1, 0.9), (0.9, 0.95, 0.99)):
        with pytest.raises(ValueError, match="betas"):
            adamw(p, lr=0.1, betas=betas)
    sgd(p, lr=0.1, momentum=0.0)
    adamw(p, lr=0.1, betas=(0.0, 0.0))  # the edges torch accepts
