"""The training optimiser: AdamW's fused kernel on plain CPU tensors, the same update as the per-tensor loop."""

import torch

from tsopsd_cli.recipe import OptimSection
from tsopsd_cli.training.optim import build_optimizer


def test_fused_adamw_on_plain_parameters_matches_the_loop():
    torch.manual_seed(0)
    models = [torch.nn.Linear(16, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    sec = OptimSection(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(models[0], sec)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 16)
    for _ in range(3):
        for m, opt in zip(models, (fused, loop)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
