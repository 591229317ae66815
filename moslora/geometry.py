"""Constant-curvature geometry in the kappa-stereographic model, as pure float32 functions.

One family of formulas covers the three kinds of space through a signed curvature ``k``:
``k < 0`` is the Poincare ball of radius ``1 / sqrt(-k)`` (hyperbolic), ``k = 0`` is Euclidean
space and ``k > 0`` is the stereographic projection of the sphere of radius ``1 / sqrt(k)``.

All maps at the origin are radial: they multiply a vector by a factor that depends only on the
curvature and the squared norm, through ``z = k * |v|^2``. The functions here are written in
terms of those radial factors (``tan_gain``, ``artan_gain`` and their rational counterparts), so
that the adapter layer can apply every expert as one per-token scalar.

Near ``z = 0`` the factors use their Taylor series, selected with ``torch.where`` instead of a
Python branch, so that the curvature gets a gradient at exactly 0 and the code has no
data-dependent control flow. Every branch is evaluated on a clamped argument, so no branch
produces a NaN that ``torch.where`` would pass on to the gradient.

References:
    [1] Bachmann, Becigneul, Ganea, "Constant Curvature Graph Convolutional Networks", ICML 2020
        (the kappa-stereographic model and its tan_k / artan_k functions).
    [2] Skopek, Ganea, Becigneul, "Mixed-curvature Variational Autoencoders", ICLR 2020
        (products of spaces of learnable curvature; stereographic and hyperboloid models).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BALL_EPS",
    "SPHERE_MAX_ANGLE",
    "artan_gain",
    "expert_gains",
    "artan_k",
    "arsinh_gain",
    "expmap0",
    "fast_exp_gain",
    "fast_log_gain",
    "from_hyperboloid",
    "from_sphere",
    "logmap0",
    "lorentz_expmap0",
    "lorentz_lift",
    "lorentz_logmap0",
    "project",
    "sinh_gain",
    "tan_gain",
    "tan_k",
    "to_hyperboloid",
    "to_sphere",
]

# Points of the Poincare ball are kept at a norm of at most (1 - BALL_EPS) / sqrt(-k). In float32
# this keeps artanh below about 3.8 and its derivative below 500.
BALL_EPS = 1e-3

# On the sphere, tan_k reaches its singularity at sqrt(k) |v| = pi / 2. The exact gains hold the
# angle at this value instead, so a spherical expert stays finite for every input.
SPHERE_MAX_ANGLE = math.pi / 2 - 0.05

# Below this |z| the gains use their Taylor series. With terms up to z^4, the truncation error
# there is below 1e-10, far under float32 rounding.
_TAYLOR_Z = 1e-2

# sinh overflows float32 near 89. Holding the Lorentz expmap's angle sqrt(-z) at this value keeps
# every Lorentz gain finite (sinh(40) is about 1e17) for inputs far outside the useful range.
LORENTZ_MAX_ANGLE = 40.0

_LORENTZ_MAX_SQ = 1e30

# The rational expmap has a square-root singularity in its derivative at z = 1/4.
_FAST_MAX_Z = 0.25 - 1e-3

_FLOAT32 = torch.float32


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == _FLOAT32 else x.to(_FLOAT32)


def _taylor_switch(
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``z`` into (use Taylor, small z, safe positive z, safe negative z).

    Each branch gets an argument inside its own domain: the series gets 0 where ``z`` is not
    small, so a huge ``z`` cannot overflow the unused polynomial and turn its zero gradient
    into NaN.
    """
    small = z.abs() < _TAYLOR_Z
    zs = torch.where(small, z, torch.zeros_like(z))
    z_pos = torch.where(z > 0, z, torch.ones_like(z)).clamp_min(_TAYLOR_Z)
    z_neg = torch.where(z < 0, z, -torch.ones_like(z)).clamp_max(-_TAYLOR_Z)
    return small, zs, z_pos, z_neg


def tan_gain(z: torch.Tensor) -> torch.Tensor:
    """Radial factor of ``expmap0``: ``tan_k(u) / u`` as a function of ``z = k u^2``.

    For ``z > 0`` it is ``tan(sqrt(z)) / sqrt(z)`` with the angle ``sqrt(z)`` held at
    ``SPHERE_MAX_ANGLE``; for ``z < 0`` it is ``tanh(sqrt(-z)) / sqrt(-z)``; at 0 it is 1.
    """
    z = _as_float32(z)
    z = z.clamp_max(SPHERE_MAX_ANGLE**2)
    small, zs, z_pos, z_neg = _taylor_switch(z)
    root_pos = z_pos.sqrt()
    root_neg = (-z_neg).sqrt()
    spherical = torch.tan(root_pos) / root_pos
    hyperbolic = torch.tanh(root_neg) / root_neg
    # tan(s)/s = 1 + z/3 + 2 z^2/15 + 17 z^3/315 + 62 z^4/2835 + ...
    series = 1 + zs * (1 / 3 + zs * (2 / 15 + zs * (17 / 315 + zs * (62 / 2835))))
    return torch.where(small, series, torch.where(z > 0, spherical, hyperbolic))


def artan_gain(z: torch.Tensor) -> torch.Tensor:
    """Radial factor of ``logmap0``: ``artan_k(y) / y`` as a function of ``z = k y^2``.

    For ``z > 0`` it is ``atan(sqrt(z)) / sqrt(z)``; for ``z < 0`` it is
    ``artanh(sqrt(-z)) / sqrt(-z)``, which needs ``z > -1`` (a point inside the ball: use
    ``project`` first); at 0 it is 1. Values of ``z`` at or below -1 are clamped to the
    largest norm ``project`` allows, so the result stays finite.
    """
    z = _as_float32(z)
    z = z.clamp_min(-((1 - BALL_EPS) ** 2))
    small, zs, z_pos, z_neg = _taylor_switch(z)
    root_pos = z_pos.sqrt()
    root_neg = (-z_neg).sqrt()
    spherical = torch.atan(root_pos) / root_pos
    hyperbolic = torch.atanh(root_neg) / root_neg
    # atan(s)/s = 1 - z/3 + z^2/5 - z^3/7 + z^4/9 - ...
    series = 1 + zs * (-1 / 3 + zs * (1 / 5 + zs * (-1 / 7 + zs * (1 / 9))))
    return torch.where(small, series, torch.where(z > 0, spherical, hyperbolic))


def fast_exp_gain(z: torch.Tensor) -> torch.Tensor:
    """Rational-mode radial factor standing in for ``tan_gain``: ``2 / (1 + sqrt(1 - 4 z))``.

    For ``k < 0`` this lifts the tangent vector ``2 v`` to the hyperboloid as its space
    coordinates and projects it stereographically onto the ball. For ``k > 0`` it is the same
    construction on the sphere, valid for ``z < 1/4`` (the hemisphere), and ``z`` is clamped
    below that. It uses no transcendental function and agrees with ``tan_gain`` to first order
    in ``v``: both are ``1 + O(z)``.
    """
    z = _as_float32(z).clamp_max(_FAST_MAX_Z)
    return 2 / (1 + (1 - 4 * z).sqrt())


def fast_log_gain(z: torch.Tensor) -> torch.Tensor:
    """Rational-mode radial factor standing in for ``artan_gain``: ``1 / (1 + z)``.

    This is the exact inverse of ``fast_exp_gain``: if ``y = fast_exp_gain(k |v|^2) v`` then
    ``v = fast_log_gain(k |y|^2) y``. As in ``artan_gain``, ``z`` is clamped above -1.
    """
    z = _as_float32(z).clamp_min(-((1 - BALL_EPS) ** 2))
    return 1 / (1 + z)


def sinh_gain(z: torch.Tensor) -> torch.Tensor:
    """Radial factor of the Lorentz model's ``expmap0`` on its space coordinates.

    With curvature ``k < 0`` and ``z = k |v|^2``, the space part of ``expmap0(v)`` on the
    hyperboloid is ``sinh(sqrt(-z)) / sqrt(-z) * v``. Positive ``z`` is treated as 0 (the
    Lorentz model has no positive curvature) and the angle ``sqrt(-z)`` is held at
    ``LORENTZ_MAX_ANGLE``.
    """
    z = _as_float32(z).clamp(min=-(LORENTZ_MAX_ANGLE**2), max=0.0)
    small, zs, _, z_neg = _taylor_switch(z)
    root = (-z_neg).sqrt()
    exact = torch.sinh(root) / root
    # sinh(s)/s with s^2 = -z: 1 - z/6 + z^2/120 - z^3/5040 + z^4/362880 - ...
    series = 1 + zs * (-1 / 6 + zs * (1 / 120 + zs * (-1 / 5040 + zs * (1 / 362880))))
    return torch.where(small, series, exact)


def arsinh_gain(z: torch.Tensor) -> torch.Tensor:
    """Radial factor of the Lorentz model's ``logmap0``, read from the space coordinates.

    A hyperboloid point with space part ``y`` has ``logmap0`` equal to
    ``arsinh(sqrt(-z)) / sqrt(-z) * y`` with ``z = k |y|^2``. Every ``y`` in R^d is the space
    part of exactly one point, so, unlike the ball's ``artan_gain``, no projection is needed.
    Positive ``z`` is treated as 0.
    """
    z = _as_float32(z).clamp_max(0.0)
    small, zs, _, z_neg = _taylor_switch(z)
    root = (-z_neg).sqrt()
    exact = torch.asinh(root) / root
    # asinh(s)/s with s^2 = -z: 1 + z/6 + 3 z^2/40 + 5 z^3/112 + 35 z^4/1152 + ...
    series = 1 + zs * (1 / 6 + zs * (3 / 40 + zs * (5 / 112 + zs * (35 / 1152))))
    return torch.where(small, series, exact)


def lorentz_expmap0(v: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Map a tangent vector at the origin onto the hyperboloid ``<x, x>_L = 1 / k``, ``k < 0``.

    Returns ``(time, space)`` concatenated along ``dim``: ``d + 1`` coordinates for ``d``.
    """
    v = _as_float32(v)
    k = _check_sign(k, negative=True, name="lorentz_expmap0").to(v.device)
    space = sinh_gain(k * _sq_norm(v, dim)) * v
    return lorentz_lift(space, k=k, dim=dim)


def lorentz_lift(space: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Complete space coordinates to the hyperboloid point: ``time = sqrt(|space|^2 - 1 / k)``."""
    space = _as_float32(space)
    k = _check_sign(k, negative=True, name="lorentz_lift").to(space.device)
    time = (_sq_norm(space, dim) - 1 / k).sqrt()
    return torch.cat([time, space], dim=dim)


def lorentz_logmap0(x: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Inverse of ``lorentz_expmap0``: the tangent vector's ``d`` coordinates, time dropped."""
    x = _as_float32(x)
    k = _check_sign(k, negative=True, name="lorentz_logmap0").to(x.device)
    space = x.narrow(dim, 1, x.shape[dim] - 1)
    return arsinh_gain(k * _sq_norm(space, dim)) * space


def _sq_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).sum(dim=dim, keepdim=True)


def _curvature(k: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(k, dtype=_FLOAT32, device=like.device)


def tan_k(u: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """``tan_k(u)``: ``tan(sqrt(k) u) / sqrt(k)``, ``u`` or ``tanh(sqrt(-k) u) / sqrt(-k)``."""
    u = _as_float32(u)
    return u * tan_gain(_curvature(k, u) * u * u)


def artan_k(y: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """``artan_k(y)``, the inverse of ``tan_k``."""
    y = _as_float32(y)
    return y * artan_gain(_curvature(k, y) * y * y)


def expmap0(v: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Map a tangent vector at the origin onto the manifold: ``tan_k(|v|) v / |v|``."""
    v = _as_float32(v)
    return v * tan_gain(_curvature(k, v) * _sq_norm(v, dim))


def logmap0(y: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Map a point of the manifold to the tangent space at the origin: ``artan_k(|y|) y / |y|``."""
    y = _as_float32(y)
    return y * artan_gain(_curvature(k, y) * _sq_norm(y, dim))


def project_gain(sq_norm: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """Radial factor of ``project`` for a point of squared norm ``sq_norm``.

    It is ``min(1, (1 - BALL_EPS) / sqrt(-k |y|^2))`` for ``k < 0`` and 1 otherwise.
    """
    sq_norm = _as_float32(sq_norm)
    z = _curvature(k, sq_norm) * sq_norm
    limit = (1 - BALL_EPS) ** 2
    outside = -z > limit
    safe = torch.where(outside, -z, torch.ones_like(z))
    return torch.where(outside, (1 - BALL_EPS) / safe.sqrt(), torch.ones_like(z))


def project(y: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Pull a point back inside the model's domain: the open ball for ``k < 0``, all space else."""
    y = _as_float32(y)
    return y * project_gain(_sq_norm(y, dim), k)


def _check_sign(k: torch.Tensor | float, negative: bool, name: str) -> torch.Tensor:
    k = torch.as_tensor(k, dtype=_FLOAT32)
    bad = (k >= 0) if negative else (k <= 0)
    if bool(bad.any()):
        wanted = "negative" if negative else "positive"
        raise ValueError(f"{name} needs a {wanted} curvature k, got {k.tolist()}")
    return k


def to_hyperboloid(y: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Map a point of the Poincare ball (``k < 0``) to the Lorentz hyperboloid.

    The hyperboloid is ``{x : -x_0^2 + |x_s|^2 = 1 / k, x_0 > 0}`` in ``R^(d+1)``; the time
    coordinate ``x_0`` comes first along ``dim``. The map is rational (inverse stereographic
    projection from the point ``(-1 / sqrt(-k), 0)``):
    ``x_0 = (1 - k |y|^2) / (sqrt(-k) (1 + k |y|^2))``, ``x_s = 2 y / (1 + k |y|^2)``.
    """
    y = _as_float32(y)
    k = _check_sign(k, negative=True, name="to_hyperboloid").to(y.device)
    z = k * _sq_norm(y, dim)
    denominator = 1 + z
    time = (1 - z) / ((-k).sqrt() * denominator)
    return torch.cat([time, 2 * y / denominator], dim=dim)


def from_hyperboloid(x: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Inverse of ``to_hyperboloid``: ``y = x_s / (1 + sqrt(-k) x_0)``."""
    x = _as_float32(x)
    k = _check_sign(k, negative=True, name="from_hyperboloid").to(x.device)
    time, space = x.narrow(dim, 0, 1), x.narrow(dim, 1, x.shape[dim] - 1)
    return space / (1 + (-k).sqrt() * time)


def to_sphere(y: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Map a point of the stereographic model (``k > 0``) onto the sphere in ``R^(d+1)``.

    The sphere is ``{x : x_0^2 + |x_s|^2 = 1 / k}`` with the origin of the model at
    ``(1 / sqrt(k), 0)``; projection is from the antipode ``(-1 / sqrt(k), 0)``:
    ``x_0 = (1 - k |y|^2) / (sqrt(k) (1 + k |y|^2))``, ``x_s = 2 y / (1 + k |y|^2)``.
    """
    y = _as_float32(y)
    k = _check_sign(k, negative=False, name="to_sphere").to(y.device)
    z = k * _sq_norm(y, dim)
    denominator = 1 + z
    time = (1 - z) / (k.sqrt() * denominator)
    return torch.cat([time, 2 * y / denominator], dim=dim)


def from_sphere(x: torch.Tensor, *, k: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Inverse of ``to_sphere``: ``y = x_s / (1 + sqrt(k) x_0)`` (undefined at the antipode)."""
    x = _as_float32(x)
    k = _check_sign(k, negative=False, name="from_sphere").to(x.device)
    time, space = x.narrow(dim, 0, 1), x.narrow(dim, 1, x.shape[dim] - 1)
    return space / (1 + k.sqrt() * time)


def expert_gains(
    k: torch.Tensor,
    input_sq: torch.Tensor,
    output_sq: torch.Tensor,
    *,
    fast: bool = False,
    lorentz: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token scalars ``c_e`` with ``Delta_e(x) = c_e * B_e A_e x``, shape (N, E).

    ``Delta_e(x) = s * logmap0_k(project_k(B_e A_e expmap0_k(x / s)))`` and all three maps are
    radial, so ``c_e`` is the product of their factors. ``k`` contains the E curvatures,
    ``input_sq`` (N, 1) is ``|x / s|^2`` and ``output_sq`` (N, E) is ``|B_e A_e x / s|^2``.
    ``fast`` selects the rational factors instead of tan/artan.

    ``lorentz`` (E,) marks experts in the Lorentz model: their low-rank map acts on the
    hyperboloid's space coordinates, ``c_e`` is the product of the sinh and arsinh factors, and
    ``fast`` does not change them.
    """
    if lorentz is not None and bool(lorentz.all()):
        return _lorentz_gains(k, input_sq, output_sq)
    exp_gain, log_gain = (fast_exp_gain, fast_log_gain) if fast else (tan_gain, artan_gain)
    gain_in = exp_gain(k * input_sq)  # (N, E)
    mapped_sq = output_sq * gain_in.square()  # |B_e A_e expmap0(x / s)|^2
    gain_project = project_gain(mapped_sq, k)
    gain_out = log_gain(k * gain_project.square() * mapped_sq)
    gains = gain_in * gain_project * gain_out
    if lorentz is not None and bool(lorentz.any()):
        gains = torch.where(lorentz, _lorentz_gains(k, input_sq, output_sq), gains)
    return gains


def _lorentz_gains(k: torch.Tensor, input_sq: torch.Tensor, output_sq: torch.Tensor):
    gain_in = sinh_gain(k * input_sq)  # (N, E)
    # |B_e A_e space(expmap0(x / s))|^2, held below float32's range for extreme inputs.
    mapped_sq = (output_sq * gain_in.square()).clamp_max(_LORENTZ_MAX_SQ)
    return gain_in * arsinh_gain(k * mapped_sq)
