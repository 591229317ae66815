"""The kappa-stereographic maps against geoopt in float64, over a curvature grid with 0."""

import math

import geoopt
import pytest
import torch
from geoopt.manifolds.stereographic import math as oracle_math

from moslora import geometry

# Both signs on a log grid, and exactly 0.
CURVATURES = [-2.0, -0.5, -1e-2, -1e-4, -1e-7, 0.0, 1e-7, 1e-4, 1e-2, 0.5, 2.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _oracle(k: float) -> geoopt.Stereographic:
    return geoopt.Stereographic(k=k, learnable=False).to(torch.float64)


def _vectors(seed: int, scale: float, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    return (
        v
        / v.norm(dim=-1, keepdim=True)
        * scale
        * torch.rand(64, 1, generator=generator, dtype=torch.float64)
    ).to(dtype)


def _in_domain_norm(k: float) -> float:
    """A tangent norm whose image stays away from the sphere's singularity."""
    return 1.0 if k <= 0 else min(1.0, 1.2 / math.sqrt(k))


@pytest.mark.parametrize("k", CURVATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_expmap0_matches_geoopt(k, seed):
    v = _vectors(seed, _in_domain_norm(k))
    expected = _oracle(k).expmap0(v)
    actual = geometry.expmap0(v.float(), k=k)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", CURVATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_logmap0_matches_geoopt(k, seed):
    oracle = _oracle(k)
    y = oracle.projx(_vectors(seed, 0.9 / math.sqrt(abs(k)) if k < 0 else 1.5))
    expected = oracle.logmap0(y)
    actual = geometry.logmap0(y.float(), k=k)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", CURVATURES)
def test_tan_k_and_artan_k_match_geoopt(k):
    u = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64) * _in_domain_norm(k)
    k64 = torch.tensor(k, dtype=torch.float64)
    torch.testing.assert_close(
        geometry.tan_k(u.float(), k=k).double(), oracle_math.tan_k(u, k64), rtol=1e-5, atol=1e-6
    )
    y = u * (0.9 / math.sqrt(abs(k)) if k < 0 else 1.0)
    torch.testing.assert_close(
        geometry.artan_k(y.float(), k=k).double(), oracle_math.artan_k(y, k64), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("k", [k for k in CURVATURES if k < 0])
def test_project_matches_geoopt_ball(k):
    y = _vectors(3, 5.0 / math.sqrt(-k))
    projected = geometry.project(y.float(), k=k).double()
    radius = 1 / math.sqrt(-k)
    assert (projected.norm(dim=-1) <= radius * (1 - geometry.BALL_EPS) * (1 + 1e-6)).all()
    inside = y.norm(dim=-1) < radius * (1 - geometry.BALL_EPS)
    torch.testing.assert_close(projected[inside], y[inside], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", CURVATURES)
def test_logmap0_inverts_expmap0(k):
    v = _vectors(4, _in_domain_norm(k), torch.float32)
    torch.testing.assert_close(
        geometry.logmap0(geometry.expmap0(v, k=k), k=k), v, rtol=1e-4, atol=1e-5
    )


def test_gains_are_one_at_zero_curvature():
    z = torch.zeros(5)
    for gain in (
        geometry.tan_gain,
        geometry.artan_gain,
        geometry.fast_exp_gain,
        geometry.fast_log_gain,
    ):
        assert torch.equal(gain(z), torch.ones(5))


@pytest.mark.parametrize("gain", [geometry.tan_gain, geometry.artan_gain])
def test_gain_continuous_across_taylor_switch(gain):
    # Values just inside and just outside the Taylor region agree to float32 rounding.
    edge = torch.tensor([1e-2 - 1e-6, 1e-2 + 1e-6, -1e-2 + 1e-6, -1e-2 - 1e-6], dtype=torch.float32)
    values = gain(edge)
    assert abs(values[0] - values[1]) < 1e-6
    assert abs(values[2] - values[3]) < 1e-6


def test_curvature_gradient_at_zero():
    # d/dk tan_k(u) at k = 0 is u^3 / 3, and d/dk artan_k(y) is -y^3 / 3.
    u = torch.tensor([0.3, -1.2, 2.0])
    k = torch.zeros((), requires_grad=True)
    geometry.tan_k(u, k=k).sum().backward()
    assert torch.allclose(k.grad, (u**3 / 3).sum(), rtol=1e-5)
    k = torch.zeros((), requires_grad=True)
    geometry.artan_k(u, k=k).sum().backward()
    assert torch.allclose(k.grad, -(u**3 / 3).sum(), rtol=1e-5)


def test_curvature_gradient_matches_geoopt_away_from_zero():
    u = _vectors(5, 0.8)
    for k_value in (-0.7, 0.7):
        k = torch.tensor(k_value, requires_grad=True)
        geometry.expmap0(u.float(), k=k).pow(2).sum().backward()
        k64 = torch.tensor(k_value, dtype=torch.float64, requires_grad=True)
        oracle_math.expmap0(u, k=k64).pow(2).sum().backward()
        torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", CURVATURES)
@pytest.mark.parametrize("norm", [0.0, 1e-6, 1.0, 30.0, 1e4])
def test_maps_finite_with_finite_gradients(dtype, k, norm):
    v = torch.full((4, 16), norm / 4, dtype=dtype)
    v[0] = 0
    v.requires_grad_(True)
    curvature = torch.tensor(k, requires_grad=True)
    y = geometry.project(geometry.expmap0(v, k=curvature), k=curvature)
    out = geometry.logmap0(y, k=curvature)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.isfinite(curvature.grad)


@pytest.mark.parametrize("k", [-2.0, -0.5, -1e-3])
def test_expmap0_stays_in_ball_for_huge_inputs(k):
    v = torch.randn(16, 8) * 1e4
    y = geometry.project(geometry.expmap0(v, k=k), k=k)
    assert (y.norm(dim=-1) * math.sqrt(-k) < 1).all()


@pytest.mark.parametrize("k", [1e-3, 0.5, 2.0])
def test_spherical_gain_held_below_singularity(k):
    u2 = torch.logspace(-3, 6, 50)
    gains = geometry.tan_gain(k * u2)
    assert torch.isfinite(gains).all()
    assert gains.max() <= math.tan(geometry.SPHERE_MAX_ANGLE) / geometry.SPHERE_MAX_ANGLE + 1e-4


@pytest.mark.parametrize("k", [-2.0, -0.5, -1e-3, 1e-3, 0.5, 2.0])
def test_fast_maps_are_mutual_inverses(k):
    v = _vectors(6, 0.4 / math.sqrt(abs(k)), torch.float32)
    y = v * geometry.fast_exp_gain(k * v.pow(2).sum(-1, keepdim=True))
    back = y * geometry.fast_log_gain(k * y.pow(2).sum(-1, keepdim=True))
    torch.testing.assert_close(back, v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [-1.0, 1.0])
def test_fast_maps_agree_with_exact_to_first_order(k):
    # Both maps are v + O(|v|^3): their difference shrinks at least like |v|^3.
    direction = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    errors = []
    for t in (1e-1, 1e-2):
        v = direction * t
        z = k * v.pow(2).sum(-1, keepdim=True)
        exact, fast = v * geometry.tan_gain(z), v * geometry.fast_exp_gain(z)
        errors.append(float((exact - fast).norm() / t))
    assert errors[0] < 1e-2
    assert errors[1] < errors[0] / 50


def test_fast_hyperbolic_exp_is_lorentz_lift_then_stereographic():
    # Lift 2v to the hyperboloid as its space coordinates, then project onto the ball.
    k = -0.8
    v = _vectors(7, 3.0, torch.float32)
    space = 2 * v
    time = torch.sqrt(1 / -k + space.pow(2).sum(-1, keepdim=True))
    lifted = torch.cat([time, space], dim=-1)
    expected = geometry.from_hyperboloid(lifted, k=k)
    actual = v * geometry.fast_exp_gain(k * v.pow(2).sum(-1, keepdim=True))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [-2.0, -0.5, -1e-3])
def test_hyperboloid_round_trip_and_constraint(k):
    oracle = _oracle(k)
    y = oracle.projx(_vectors(8, 0.95 / math.sqrt(-k)))
    x = geometry.to_hyperboloid(y, k=k).double()
    lorentz = -(x[:, 0] ** 2) + x[:, 1:].pow(2).sum(-1)
    torch.testing.assert_close(lorentz, torch.full_like(lorentz, 1 / k), rtol=1e-3, atol=1e-3)
    assert (x[:, 0] > 0).all()
    torch.testing.assert_close(geometry.from_hyperboloid(x, k=k).double(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [-2.0, -0.5])
def test_hyperboloid_distance_matches_ball_distance(k):
    # The conversion is an isometry: Lorentz distances equal geoopt's ball distances.
    oracle = _oracle(k)
    a = oracle.projx(_vectors(9, 0.7 / math.sqrt(-k)))
    b = oracle.projx(_vectors(10, 0.7 / math.sqrt(-k)))
    xa = geometry.to_hyperboloid(a, k=k).double()
    xb = geometry.to_hyperboloid(b, k=k).double()
    inner = -xa[:, 0] * xb[:, 0] + (xa[:, 1:] * xb[:, 1:]).sum(-1)
    radius = 1 / math.sqrt(-k)
    lorentz_distance = radius * torch.acosh((-inner / radius**2).clamp_min(1))
    torch.testing.assert_close(lorentz_distance, oracle.dist(a, b), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("k", [1e-3, 0.5, 2.0])
def test_sphere_round_trip_and_distance(k):
    oracle = _oracle(k)
    a = _vectors(11, 1.0 / math.sqrt(k))
    b = _vectors(12, 1.0 / math.sqrt(k))
    xa = geometry.to_sphere(a, k=k).double()
    xb = geometry.to_sphere(b, k=k).double()
    torch.testing.assert_close(
        xa.pow(2).sum(-1), torch.full((64,), 1 / k, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(geometry.from_sphere(xa, k=k).double(), a, rtol=1e-4, atol=1e-5)
    radius = 1 / math.sqrt(k)
    cosine = ((xa * xb).sum(-1) / radius**2).clamp(-1, 1)
    torch.testing.assert_close(radius * torch.acos(cosine), oracle.dist(a, b), rtol=2e-3, atol=1e-3)


def test_conversions_reject_wrong_sign():
    y = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="negative curvature"):
        geometry.to_hyperboloid(y, k=0.5)
    with pytest.raises(ValueError, match="positive curvature"):
        geometry.to_sphere(y, k=-0.5)
