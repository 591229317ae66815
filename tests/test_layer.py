"""The MoSLoRA linear layer: LoRA equivalence, fused against reference, routing, bounds."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from moslora import MoSLoraConfig, MoSLoraLinear
from moslora.routing import route


def _layer(experts, *, seed=0, in_features=24, out_features=20, **overrides) -> MoSLoraLinear:
    torch.manual_seed(seed)
    settings = {"experts": experts, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **overrides}
    layer = MoSLoraLinear(nn.Linear(in_features, out_features))
    layer.add_adapter("default", MoSLoraConfig(**settings))
    return layer


def _randomise_b(layer: MoSLoraLinear, std=0.3, name="default") -> None:
    with torch.no_grad():
        layer.moslora_B[name].normal_(std=std)


def _peft_lora(base: nn.Linear, rank: int, alpha: float):
    model = nn.Sequential(nn.Linear(base.in_features, base.out_features))
    model[0].load_state_dict(base.state_dict())
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
    return get_peft_model(model, config)


@pytest.mark.parametrize("kind", ["euclidean", "free"])
def test_flat_expert_equals_peft_lora(kind):
    # A euclidean expert, and a free expert at its initial curvature of exactly 0, are LoRA.
    layer = _layer([kind])
    _randomise_b(layer)
    assert float(layer.curvature()[0].detach()) == 0.0
    peft_model = _peft_lora(layer.base_layer, rank=4, alpha=8)
    lora = peft_model.base_model.model[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.moslora_A["default"])
        lora.lora_B["default"].weight.copy_(layer.moslora_B["default"])
    x = torch.randn(3, 5, 24) * 4
    torch.testing.assert_close(layer(x), peft_model(x), rtol=1e-6, atol=1e-6)


def test_flat_expert_gradients_equal_peft_lora():
    layer = _layer(["free"])
    _randomise_b(layer)
    peft_model = _peft_lora(layer.base_layer, rank=4, alpha=8)
    lora = peft_model.base_model.model[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.moslora_A["default"])
        lora.lora_B["default"].weight.copy_(layer.moslora_B["default"])
    x = torch.randn(7, 24)
    layer(x).pow(2).sum().backward()
    peft_model(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.moslora_A["default"].grad, lora.lora_A["default"].weight.grad)
    torch.testing.assert_close(layer.moslora_B["default"].grad, lora.lora_B["default"].weight.grad)


@pytest.mark.parametrize(
    "experts",
    [
        ["hyperbolic"],
        ["spherical"],
        ["euclidean", "hyperbolic", "spherical"],
        ["hyperbolic", "hyperbolic", "free"],
    ],
)
@pytest.mark.parametrize("router", ["dense", "topk"])
def test_fused_update_matches_reference(experts, router):
    layer = _layer(experts, router=router, top_k=1, init_curvature={"free": -0.3})
    _randomise_b(layer, std=0.5)
    x = torch.randn(4, 6, 24) * 2
    torch.testing.assert_close(
        layer._update(x, "default"), layer.reference_update(x), rtol=1e-4, atol=1e-5
    )


def test_fused_gradients_match_reference():
    layer = _layer(["euclidean", "hyperbolic", "spherical"])
    _randomise_b(layer, std=0.5)
    x = torch.randn(10, 24) * 3
    parameters = [p for name, p in layer.named_parameters() if name.startswith("moslora_")]
    fused = torch.autograd.grad(layer._update(x, "default").pow(2).sum(), parameters)
    reference = torch.autograd.grad(layer.reference_update(x).pow(2).sum(), parameters)
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("transition", ["exact", "fast"])
def test_zero_b_leaves_base_output_unchanged(transition):
    layer = _layer(["euclidean", "hyperbolic", "spherical"], transition=transition)
    x = torch.randn(3, 24) * 100
    assert torch.equal(layer(x), layer.base_layer(x))


def test_fast_transition_close_to_exact_for_small_inputs():
    exact = _layer(["hyperbolic", "spherical"], input_scale=1.0)
    fast = _layer(["hyperbolic", "spherical"], input_scale=1.0, transition="fast")
    fast.load_state_dict(exact.state_dict())
    _randomise_b(exact, std=0.05)
    fast.moslora_B["default"].data.copy_(exact.moslora_B["default"])
    x = torch.randn(8, 24) * 0.01
    exact_update, fast_update = exact._update(x, "default"), fast._update(x, "default")
    relative = (exact_update - fast_update).norm() / exact_update.norm()
    assert relative < 1e-3


def test_curvature_sign_and_bound():
    layer = _layer(["hyperbolic", "spherical", "free", "euclidean"], max_curvature=1.5)
    with torch.no_grad():
        for raw in (-1e4, -3.0, 0.0, 3.0, 1e4):
            layer.moslora_curvature["default"].fill_(raw)
            k = layer.curvature()
            assert -1.5 <= k[0] <= 0
            assert 0 <= k[1] <= 1.5
            assert -1.5 <= k[2] <= 1.5
            assert k[3] == 0


def test_initial_curvature_matches_config():
    layer = _layer(
        ["hyperbolic", "spherical", "free"],
        init_curvature={"hyperbolic": -0.25, "spherical": 1.0, "free": 0.3},
    )
    torch.testing.assert_close(layer.curvature(), torch.tensor([-0.25, 1.0, 0.3]))


def test_input_scale_defaults_to_sqrt_in_features():
    layer = _layer(["hyperbolic"])
    assert math.isclose(float(layer.input_scale().detach()), math.sqrt(24), rel_tol=1e-6)


def test_curvature_frozen_when_not_learned():
    layer = _layer(["hyperbolic"], learn_curvature=False, learn_input_scale=False)
    assert not layer.moslora_curvature["default"].requires_grad
    assert not layer.moslora_log_scale["default"].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_base_keeps_float32_geometry(dtype):
    layer = _layer(["euclidean", "hyperbolic", "spherical"])
    _randomise_b(layer)
    layer.base_layer.to(dtype)
    x = (torch.randn(5, 24) * 50).to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.moslora_curvature["default"].grad).all()


def test_router_records_aux_loss_and_statistics():
    layer = _layer(["euclidean", "hyperbolic", "spherical"])
    layer(torch.randn(2, 9, 24))
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    stats = layer.routing_stats
    assert stats["mean_probability"].shape == (3,)
    torch.testing.assert_close(stats["mean_probability"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(stats["dispatch_fraction"].sum(), torch.tensor(1.0))


def test_single_expert_has_no_router():
    layer = _layer(["hyperbolic"])
    layer(torch.randn(3, 24))
    assert "default" not in layer.moslora_router
    assert layer.aux_loss is None


def test_route_topk_keeps_k_experts():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    out = route(logits, mode="topk", top_k=2)
    assert ((out.weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2))
    assert out.weights[0, 2] == 0
    assert out.weights[1, 0] == 0


def test_route_aux_loss_extremes():
    # Uniform routing gives exactly 1; every token on one expert gives E.
    uniform = route(torch.zeros(8, 4), mode="dense")
    assert math.isclose(float(uniform.aux_loss), 1.0, rel_tol=1e-6)
    collapsed = route(torch.tensor([[50.0, 0.0, 0.0, 0.0]]).repeat(8, 1), mode="dense")
    assert math.isclose(float(collapsed.aux_loss), 4.0, rel_tol=1e-4)


def test_aux_loss_gradient_spreads_routing():
    # One gradient step on the aux loss alone moves the router towards uniform usage.
    layer = _layer(["euclidean", "hyperbolic", "spherical"])
    router = layer.moslora_router["default"]
    with torch.no_grad():
        router.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    x = torch.randn(64, 24)
    layer(x)
    before = float(layer.aux_loss)
    layer.aux_loss.backward()
    with torch.no_grad():
        for parameter in router.parameters():
            parameter -= 1.0 * parameter.grad
    layer(x)
    assert float(layer.aux_loss) < before


def test_merged_weight_for_single_euclidean_expert():
    layer = _layer(["euclidean"])
    _randomise_b(layer)
    x = torch.randn(4, 24)
    merged = nn.Linear(24, 20)
    merged.load_state_dict(layer.base_layer.state_dict())
    merged.weight.data.copy_(layer.merged_weight("default"))
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("experts", "message"),
    [(["hyperbolic"], "non-Euclidean"), (["euclidean", "euclidean"], "router weights")],
)
def test_merged_weight_rejects_nonlinear_updates(experts, message):
    layer = _layer(experts)
    with pytest.raises(ValueError, match=message):
        layer.merged_weight("default")


def test_layer_rejects_non_linear_module():
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        MoSLoraLinear(nn.Conv1d(3, 3, 1))


def test_compiled_gains_match_eager():
    eager = _layer(["euclidean", "hyperbolic", "spherical"])
    compiled = _layer(["euclidean", "hyperbolic", "spherical"], compile=True)
    compiled.load_state_dict(eager.state_dict())
    _randomise_b(eager, std=0.5)
    compiled.moslora_B["default"].data.copy_(eager.moslora_B["default"])
    x = torch.randn(6, 24) * 3
    eager_out, compiled_out = eager(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    eager_out.pow(2).sum().backward()
    compiled_out.pow(2).sum().backward()
    for name in ("moslora_A", "moslora_B", "moslora_curvature", "moslora_log_scale"):
        torch.testing.assert_close(
            getattr(compiled, name)["default"].grad,
            getattr(eager, name)["default"].grad,
            rtol=1e-4,
            atol=1e-6,
        )
