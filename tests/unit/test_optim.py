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


def test_gradient_and_weight_norms_in_float64_slices(monkeypatch):
    """clip_grad_norm and weight_norm sum squares in float64 a slice at a time (no float64 copy of a whole
    embedding): the same norms as a float64 reference over tensors of several slices and a partial one, bf16 and
    float32; NaN and inf come through; clipping scales every gradient to the limit."""
    import math

    from tsopsd_cli.parallel import group, reductions, sharding

    monkeypatch.setattr(reductions, "_SQ_SLICE", 7)
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(5, 9, generator=g).bfloat16())  # 45 elements: 6 slices and 3 left
    model.b = torch.nn.Parameter(torch.randn(4, generator=g))
    model.frozen = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    for p in (model.a, model.b):
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 10
    pl = sharding.Placement(strategy="single", device=torch.device("cpu"), master_dtype=torch.float32,
                            compute_dtype=torch.float32, frozen_sharded=False, world=1)
    dist = group.Dist.__new__(group.Dist)  # one process: the sums are never reduced

    def ref(ts):
        return math.sqrt(sum(float(x) ** 2 for t in ts for x in t.detach().double().reshape(-1).tolist()))

    assert math.isclose(reductions.weight_norm(model, pl, dist), ref([model.a, model.b]), rel_tol=1e-12)
    want = ref([model.a.grad, model.b.grad])
    grads = [model.a.grad.double().clone(), model.b.grad.double().clone()]
    assert math.isclose(reductions.clip_grad_norm(model, 1.0, pl, dist), want, rel_tol=1e-12)
    assert math.isclose(ref([model.a.grad, model.b.grad]), 1.0, rel_tol=1e-2)  # bf16 rounding of the scaled grads
    torch.testing.assert_close(model.b.grad.double(), grads[1] / (want + 1e-6))
    model.a.grad.view(-1)[40] = float("nan")
    assert math.isnan(reductions.clip_grad_norm(model, None, pl, dist))
    with torch.no_grad():
        model.b[2] = float("inf")
    assert reductions.weight_norm(model, pl, dist) == float("inf")
