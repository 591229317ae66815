"""The method switch: the Lorentz expert, PEFT baselines, budget matching and the recipes."""

import json
from pathlib import Path

import geoopt
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from torch import nn

from moslora import MoSLoraConfig, MoSLoraModel, geometry
from moslora.cli import build_parser, main
from moslora.config import CONFIG_NAME, WEIGHTS_NAME
from moslora.layer import MoSLoraLinear
from moslora.methods import (
    METHODS,
    MOSLORA_METHODS,
    adapter_config_for,
    attach_adapter,
    load_trained_adapter,
    method_of,
    read_adapter_config,
    summed_rank,
)
from moslora.train import RUN_CONFIG_NAME, MoSLoraTrainer, TrainConfig, train
from tests.test_train import _interrupt_after, _train_args
from tests.tiny_models import tiny_model

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "methods"


# ---- the Lorentz expert ---------------------------------------------------------------------


def _lorentz_oracle(x, a, b, k, scale):
    """One Lorentz expert's update in float64 with geoopt's hyperboloid maps."""
    manifold = geoopt.manifolds.Lorentz(k=-1 / k)  # geoopt's hyperboloid has <x, x> = -k
    tangent = torch.cat([torch.zeros(x.shape[0], 1, dtype=x.dtype), x / scale], dim=-1)
    point = manifold.expmap0(tangent)
    space = point[:, 1:] @ a.t() @ b.t()
    time = (space.pow(2).sum(-1, keepdim=True) + manifold.k).sqrt()
    back = manifold.logmap0(torch.cat([time, space], dim=-1))
    return scale * back[:, 1:]


# geoopt's Lorentz logmap0 clamps its arcosh argument, which costs it a relative error of 3e-4
# at a norm of 0.01 even in float64, so small inputs are compared with LoRA below instead.
@pytest.mark.parametrize("input_norm", [0.5, 1.0, 4.0])
def test_lorentz_expert_matches_geoopt(input_norm):
    torch.manual_seed(0)
    layer = MoSLoraLinear(nn.Linear(12, 10))
    config = MoSLoraConfig(experts=["lorentz"], r=3, lora_dropout=0.0, input_scale=2.0)
    layer.add_adapter("default", config)
    with torch.no_grad():
        layer.moslora_B["default"].normal_(std=0.4)
    x = torch.randn(7, 12)
    x = x / x.norm(dim=-1, keepdim=True) * input_norm * 2.0
    k = float(layer.curvature()[0].detach())
    expected = config.scaling * _lorentz_oracle(
        x.double(),
        layer.moslora_A["default"].double(),
        layer.moslora_B["default"].double(),
        k,
        2.0,
    )
    torch.testing.assert_close(layer._update(x, "default").double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.reference_update(x).double(), expected, rtol=1e-4, atol=1e-6)


def test_lorentz_expert_near_origin_is_lora():
    torch.manual_seed(0)
    layer = MoSLoraLinear(nn.Linear(12, 10))
    config = MoSLoraConfig(experts=["lorentz"], r=3, lora_dropout=0.0, input_scale=1.0)
    layer.add_adapter("default", config)
    with torch.no_grad():
        layer.moslora_B["default"].normal_(std=0.4)
    x = torch.randn(7, 12)
    x = x / x.norm(dim=-1, keepdim=True) * 1e-3
    a, b = layer.moslora_A["default"], layer.moslora_B["default"]
    lora = config.scaling * x @ a.t() @ b.t()
    torch.testing.assert_close(layer._update(x, "default"), lora, rtol=1e-5, atol=1e-9)


def test_lorentz_maps_are_inverse():
    torch.manual_seed(0)
    v = torch.randn(6, 5) * 2
    point = geometry.lorentz_expmap0(v, k=-0.7)
    # The point lies on the hyperboloid -time^2 + |space|^2 = 1 / k, compared as
    # time^2 = |space|^2 - 1 / k because the difference of the two large squares cancels.
    space_sq = point[:, 1:].pow(2).sum(-1)
    torch.testing.assert_close(point[:, 0] ** 2, space_sq + 1 / 0.7, rtol=1e-5, atol=0)
    torch.testing.assert_close(geometry.lorentz_logmap0(point, k=-0.7), v, rtol=1e-4, atol=1e-5)


def test_lorentz_gains_finite_for_huge_inputs():
    k = torch.tensor([-2.0], requires_grad=True)
    input_sq = torch.tensor([[0.0], [1e-8], [1.0], [1e4], [1e12]])
    output_sq = torch.tensor([[0.0], [1e-8], [3.0], [1e4], [1e12]])
    gains = geometry.expert_gains(k, input_sq, output_sq, lorentz=torch.tensor([True]))
    gains.sum().backward()
    assert torch.isfinite(gains).all()
    assert torch.isfinite(k.grad).all()
    assert gains[0, 0] == 1


def test_lorentz_unchanged_by_fast_transition():
    k = torch.tensor([-0.5, -0.5])
    input_sq = torch.rand(9, 1) * 3
    output_sq = torch.rand(9, 2) * 3
    mask = torch.tensor([True, False])
    exact = geometry.expert_gains(k, input_sq, output_sq, lorentz=mask)
    fast = geometry.expert_gains(k, input_sq, output_sq, fast=True, lorentz=mask)
    torch.testing.assert_close(fast[:, 0], exact[:, 0])
    assert not torch.allclose(fast[:, 1], exact[:, 1])


def test_lorentz_and_ball_experts_differ():
    # The Lorentz expert is not the Poincare-ball expert in other coordinates: its low-rank map
    # acts on different points, so the updates differ away from the origin.
    k = torch.tensor([-0.5, -0.5])
    input_sq = torch.full((1, 1), 4.0)
    output_sq = torch.full((1, 2), 1.0)
    gains = geometry.expert_gains(k, input_sq, output_sq, lorentz=torch.tensor([True, False]))
    assert abs(float(gains[0, 0] - gains[0, 1])) > 0.1


def test_lorentz_curvature_negative_and_learned():
    layer = MoSLoraLinear(nn.Linear(8, 8))
    layer.add_adapter("default", MoSLoraConfig(experts=["lorentz"], r=2))
    assert float(layer.curvature()[0].detach()) == pytest.approx(-0.5, rel=1e-5)
    with torch.no_grad():
        layer.moslora_B["default"].normal_()
    layer._update(torch.randn(4, 8) * 3, "default").sum().backward()
    assert layer.moslora_curvature["default"].grad.abs().sum() > 0


def test_lorentz_init_curvature_sign_checked():
    with pytest.raises(ValueError, match="init_curvature\\['lorentz'\\] must be negative"):
        MoSLoraConfig(experts=["lorentz"], init_curvature={"lorentz": 0.3})


# ---- building each method's adapter configuration -------------------------------------------


@pytest.mark.parametrize("method", sorted(MOSLORA_METHODS))
def test_moslora_methods_set_experts(method):
    config = adapter_config_for(method)
    assert isinstance(config, MoSLoraConfig)
    assert config.experts == MOSLORA_METHODS[method]
    assert method_of(config) == method


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_methods_build_lora_config(method):
    config = adapter_config_for(method, {"r": 6, "lora_alpha": 12, "lora_dropout": 0.1})
    assert isinstance(config, LoraConfig)
    assert config.use_dora is (method == "dora")
    assert config.r == 6
    assert config.lora_alpha == 12
    assert config.lora_dropout == 0.1
    assert method_of(config) == method


def test_peft_method_rejects_moslora_settings():
    with pytest.raises(ValueError, match="--router applies only to MoSLoRA adapters"):
        adapter_config_for("lora", {"router": "topk"})


def test_peft_method_accepts_moslora_defaults():
    config = adapter_config_for("lora", {"router": "dense", "share_router": False})
    assert isinstance(config, LoraConfig)


def test_recipe_error_names_file(tmp_path, capsys):
    recipe = tmp_path / "lora-router.yaml"
    recipe.write_text("method: lora\nrouter: topk\n")
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "--router applies only to MoSLoRA adapters" in error
    assert str(recipe) in error


def test_method_rejects_contradicting_experts():
    with pytest.raises(ValueError, match="contradicts --method hyperbolic"):
        adapter_config_for("hyperbolic", {"experts": ["spherical"]})


def test_unknown_method_named():
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        adapter_config_for("qlora")


@pytest.mark.parametrize(
    ("method", "rank", "alpha"),
    [("lora", 24, 48.0), ("dora", 24, 48.0), ("hyplora", 24, 48.0), ("moslora", 8, 16.0)],
)
def test_total_rank_keeps_scaling(method, rank, alpha):
    config = adapter_config_for(method, {"r": 4, "lora_alpha": 8}, total_rank=24)
    assert config.r == rank
    assert config.lora_alpha == alpha
    assert summed_rank(config) == 24


def test_total_rank_must_divide():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 experts"):
        adapter_config_for("moslora", total_rank=20)


def _module_shapes(model):
    targets = MoSLoraConfig().target_modules
    return [
        (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets
    ]


def test_budget_matching_parameter_counts():
    # Three rank-8 experts hold exactly the A and B parameters of one rank-24 LoRA; the router
    # (E weights per input feature plus E biases), E curvatures and one input scale come on top.
    shapes = _module_shapes(tiny_model())
    counts = {}
    for method in METHODS:
        model = attach_adapter(tiny_model(), adapter_config_for(method, total_rank=24))
        counts[method] = model.get_nb_trainable_parameters()[0]
    lora = sum(24 * (d_in + d_out) for d_in, d_out in shapes)
    assert counts["lora"] == lora
    assert counts["dora"] == lora + sum(d_out for _, d_out in shapes)
    for method in ("euclidean", "hyperbolic", "spherical", "hyplora"):
        assert counts[method] == lora + 2 * len(shapes)
    assert counts["moslora"] == lora + sum(3 * d_in + 3 + 3 + 1 for d_in, _ in shapes)


# ---- training and evaluating every method through the CLI ------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "hyplora"])
def test_train_and_eval_method_cli(method, tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / method
    args = _train_args(tiny_model_dir, output, "--method", method, "--total-rank", "4")
    assert main([*args, "--max-steps", "2", "--logging-steps", "1"]) == 0
    record = json.loads((output / RUN_CONFIG_NAME).read_text())
    assert record["method"] == method
    assert record["adapter"]["r"] == 4
    assert record["trainable_parameters"] > 0
    assert record["throughput"]["train_tokens"] > 0
    assert record["throughput"]["tokens_per_second"] > 0
    assert record["throughput"]["peak_memory_bytes"] > 0
    assert "trainable params" in capsys.readouterr().out
    saved = json.loads((output / CONFIG_NAME).read_text())
    assert ("peft_type" in saved) is (method != "hyplora")
    assert not (output / ".adapter-staging").exists()

    eval_dir = tmp_path / f"{method}-eval"
    code = main(
        [
            "eval", "--adapter", str(output), "--data", "mawps", "--limit", "2",
            "--max-new-tokens", "4", "--no-progress", "--output", str(eval_dir),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["count"] == 2
    assert summary["adapter"] == str(output)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_adapter_reload_applies_update(method, tiny_model_dir, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    output = tmp_path / method
    config = TrainConfig(
        output=str(output), model=str(tiny_model_dir), method=method, limit=8, max_steps=2,
        batch_size=4, lr=5e-2, progress=False,
    )  # fmt: skip
    train(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        before = base(tokens).logits
    loaded = load_trained_adapter(base, output).eval()
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        after = loaded(tokens).logits
    # The trained update is not zero, so the reloaded adapter changes the logits.
    assert not torch.allclose(before, after)
    weights = load_file(output / WEIGHTS_NAME)
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in weights.items())
    if method == "dora":
        assert any("lora_magnitude_vector" in key for key in weights)


def test_lora_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, data_dir):
    def config(output, resume=False):
        return TrainConfig(
            output=str(output), model=str(tiny_model_dir), method="lora", limit=16, max_steps=6,
            batch_size=4, save_steps=2, lr=5e-3, progress=False, resume=resume,
        )  # fmt: skip

    train(config(tmp_path / "full"))
    original, interrupted = _interrupt_after(3)
    MoSLoraTrainer.training_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path / "split"))
    finally:
        MoSLoraTrainer.training_step = original
    assert not (tmp_path / "split" / WEIGHTS_NAME).exists()
    train(config(tmp_path / "split", resume=True))

    full = load_file(tmp_path / "full" / WEIGHTS_NAME)
    resumed = load_file(tmp_path / "split" / WEIGHTS_NAME)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_resume_with_other_method_named(tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / "run"
    args = _train_args(tiny_model_dir, output, "--max-steps", "2", "--save-steps", "1")
    assert main([*args, "--method", "lora", "--r", "2"]) == 0
    (output / CONFIG_NAME).unlink()
    assert main([*args, "--method", "moslora", "--r", "2", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "--method 'lora' (now 'moslora')" in error
    assert "resume with the same settings" in error


def test_resume_with_other_lr_rejected(tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / "run"
    args = _train_args(tiny_model_dir, output, "--max-steps", "2", "--save-steps", "1")
    assert main([*args, "--lr", "1e-2", "--r", "2"]) == 0
    (output / CONFIG_NAME).unlink()
    assert main([*args, "--lr", "1e-3", "--r", "2", "--resume"]) == 2
    assert "--lr 0.01 (now 0.001)" in capsys.readouterr().err


def test_cli_method_errors_exit_2(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--method", "lora", "--router", "topk")) == 2
    assert "--router applies only to MoSLoRA adapters" in capsys.readouterr().err
    assert main(_train_args(tiny_model_dir, output, "--method", "bogus")) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert not output.exists()


def test_read_adapter_config_kinds(tmp_path):
    moslora_dir = tmp_path / "moslora"
    MoSLoraModel(tiny_model(), MoSLoraConfig(r=2)).save_pretrained(moslora_dir)
    assert isinstance(read_adapter_config(moslora_dir), MoSLoraConfig)
    peft_dir = tmp_path / "peft"
    attach_adapter(tiny_model(), adapter_config_for("lora", {"r": 2})).save_pretrained(peft_dir)
    assert isinstance(read_adapter_config(peft_dir), LoraConfig)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_adapter_config(tmp_path / "broken")


# ---- the recipes ----------------------------------------------------------------------------


def test_recipe_for_every_method():
    assert sorted(path.stem for path in RECIPES.glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_recipe_builds_budget_matched_adapter(method, tmp_path):
    from moslora.cli import _settings
    from moslora.train import TrainConfig as Train

    recipe = RECIPES / f"{method}.yaml"
    assert yaml.safe_load(recipe.read_text())["method"] == method
    args = build_parser().parse_args(["train", "--config", str(recipe), "--output", "x"])
    train_values, adapter_values = _settings(args, Train, MoSLoraConfig)
    config = Train(**train_values)
    config.validate()
    adapter = adapter_config_for(config.method, adapter_values, total_rank=config.total_rank)
    assert method_of(adapter) == method
    assert summed_rank(adapter) == 24
    assert adapter.lora_alpha / adapter.r == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 1}, "have no module in this model"),
        ({"hidden_size": 48, "intermediate_size": 96}, "does not fit this model"),
    ],
)
def test_peft_adapter_on_other_base_rejected(tmp_path, changes, message):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    folder = tmp_path / "lora"
    attach_adapter(tiny_model(), adapter_config_for("lora", {"r": 2})).save_pretrained(folder)
    config = tiny_config()
    for name, value in changes.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        load_trained_adapter(AutoModelForCausalLM.from_config(config), folder)
