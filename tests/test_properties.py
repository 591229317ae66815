"""Property-based numerics: finite outputs and gradients for any input norm and curvature."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moslora import MoSLoraConfig, MoSLoraLinear, geometry

# Curvatures on a log grid of both signs, and exactly 0.
CURVATURE = st.one_of(
    st.just(0.0),
    st.floats(min_value=-7, max_value=0.3).map(lambda e: 10.0**e),
    st.floats(min_value=-7, max_value=0.3).map(lambda e: -(10.0**e)),
)
NORM = st.one_of(st.just(0.0), st.floats(min_value=-8, max_value=4).map(lambda e: 10.0**e))
DTYPE = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SEED = st.integers(min_value=0, max_value=2**16)

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def _direction(seed: int, shape) -> torch.Tensor:
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _layer(seed: int, kinds, **overrides) -> MoSLoraLinear:
    torch.manual_seed(seed)
    layer = MoSLoraLinear(nn.Linear(16, 12))
    layer.add_adapter("default", MoSLoraConfig(experts=kinds, r=3, lora_dropout=0.0, **overrides))
    return layer


@PROPERTY_SETTINGS
@given(k=CURVATURE, norm=NORM, dtype=DTYPE, seed=SEED)
def test_maps_finite_values_and_gradients(k, norm, dtype, seed):
    v = (_direction(seed, (3, 8)) * norm).to(dtype).requires_grad_(True)
    curvature = torch.tensor(k, requires_grad=True)
    y = geometry.project(geometry.expmap0(v, k=curvature), k=curvature)
    out = geometry.logmap0(y, k=curvature)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.isfinite(curvature.grad)
    if k < 0:
        # Hyperbolic points stay strictly inside the ball of radius 1 / sqrt(-k).
        assert (y.norm(dim=-1) * math.sqrt(-k) < 1).all()


@PROPERTY_SETTINGS
@given(k=st.floats(min_value=1e-7, max_value=4.0), norm=NORM)
def test_spherical_gain_never_reaches_singularity(k, norm):
    gain = geometry.tan_gain(torch.tensor([k * norm * norm]))
    assert torch.isfinite(gain).all()
    bound = math.tan(geometry.SPHERE_MAX_ANGLE) / geometry.SPHERE_MAX_ANGLE
    assert float(gain) <= bound * (1 + 1e-5)


@PROPERTY_SETTINGS
@given(norm=NORM, dtype=DTYPE, seed=SEED, transition=st.sampled_from(["exact", "fast"]))
def test_layer_output_and_gradients_finite(norm, dtype, seed, transition):
    layer = _layer(seed, ["euclidean", "hyperbolic", "spherical", "free"], transition=transition)
    with torch.no_grad():
        layer.moslora_B["default"].normal_(std=1.0)
        layer.moslora_curvature["default"].copy_(
            torch.randn(4, generator=torch.Generator().manual_seed(seed)) * 5
        )
    layer.base_layer.to(dtype)
    x = (_direction(seed, (5, 16)) * norm).to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name in ("moslora_A", "moslora_B", "moslora_curvature", "moslora_log_scale"):
        assert torch.isfinite(getattr(layer, name)["default"].grad).all()


@PROPERTY_SETTINGS
@given(norm=NORM, dtype=DTYPE, seed=SEED)
def test_layer_equals_base_at_init(norm, dtype, seed):
    layer = _layer(seed, ["euclidean", "hyperbolic", "spherical"])
    layer.base_layer.to(dtype)
    x = (_direction(seed, (4, 16)) * norm).to(dtype)
    assert torch.equal(layer(x), layer.base_layer(x))


@PROPERTY_SETTINGS
@given(
    raw=st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
    bound=st.floats(min_value=0.6, max_value=10),
)
def test_curvature_inside_bounds(raw, bound):
    layer = _layer(0, ["hyperbolic", "spherical", "free", "euclidean"], max_curvature=bound)
    with torch.no_grad():
        layer.moslora_curvature["default"].fill_(raw)
    k = layer.curvature().detach()
    # The bound applies in float32, the precision the curvature is computed in.
    bound = float(torch.tensor(bound, dtype=torch.float32))
    assert -bound <= float(k[0]) <= 0
    assert 0 <= float(k[1]) <= bound
    assert -bound <= float(k[2]) <= bound
    assert float(k[3]) == 0


def test_hostile_learning_rate_keeps_loss_finite():
    from tiny_models import tiny_model

    from moslora import get_moslora_model

    model = get_moslora_model(
        tiny_model(), MoSLoraConfig(experts=["euclidean", "hyperbolic", "spherical", "free"], r=4)
    )
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    bound = model.peft_config["default"].max_curvature
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss + 0.01 * model.router_aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        for curvatures in model.curvatures().values():
            assert all(abs(k) <= bound for k in curvatures)
    assert torch.isfinite(loss)
