"""MoSLoraConfig validation: each invalid value names its field and the allowed values."""

import json

import pytest

from moslora import MoSLoraConfig
from moslora.config import CONFIG_NAME


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"experts": []}, "experts must list at least one"),
        (
            {"experts": ["euclidean", "toroidal"]},
            "unknown expert kind 'toroidal'; allowed: euclidean",
        ),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"max_curvature": 0}, "max_curvature must be a positive number"),
        (
            {"init_curvature": {"hyperbolic": 0.3}},
            "init_curvature\\['hyperbolic'\\] must be negative",
        ),
        (
            {"init_curvature": {"spherical": -0.3}},
            "init_curvature\\['spherical'\\] must be positive",
        ),
        ({"init_curvature": {"spherical": 5.0}}, "outside the bound"),
        ({"init_curvature": {"euclidean": 0.1}}, "euclidean experts have curvature 0"),
        ({"init_curvature": {"hyperbolic": float("nan")}}, "must be a finite number"),
        ({"router": "sparse"}, "unknown router 'sparse'; allowed: dense, topk"),
        ({"top_k": 4}, "top_k must be an integer from 1 to the number of experts \\(3\\)"),
        ({"top_k": 0}, "top_k must be an integer from 1"),
        ({"router_aux_loss_coef": -1}, "router_aux_loss_coef must be a non-negative number"),
        ({"transition": "slow"}, "unknown mode 'slow'; allowed: exact, fast"),
        ({"input_scale": 0}, "input_scale must be a positive number or None"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": ""}, "target_modules: an empty pattern"),
        ({"router_groups": "qkv"}, "router_groups must be a list of lists"),
    ],
)
def test_invalid_values_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        MoSLoraConfig(**settings)


def test_defaults_are_valid_and_documented():
    config = MoSLoraConfig()
    assert config.experts == ["euclidean", "hyperbolic", "spherical"]
    assert config.scaling == config.lora_alpha / config.r
    from dataclasses import fields

    assert all(item.metadata.get("help") for item in fields(MoSLoraConfig))


def test_save_load_round_trip(tmp_path):
    config = MoSLoraConfig(
        experts=["hyperbolic", "free"], r=3, init_curvature={"free": 0.2}, router="topk"
    )
    config.save(tmp_path)
    loaded = MoSLoraConfig.load(tmp_path)
    assert loaded == config


def test_load_rejects_unknown_field(tmp_path):
    data = {**MoSLoraConfig().to_dict(), "rank": 4}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown field\\(s\\) rank"):
        MoSLoraConfig.load(tmp_path)


def test_load_rejects_other_adapter_type(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="not a moslora adapter config"):
        MoSLoraConfig.load(tmp_path)


def test_load_rejects_invalid_json(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MoSLoraConfig.load(tmp_path)


def test_load_rejects_invalid_value_with_path(tmp_path):
    data = {**MoSLoraConfig().to_dict(), "experts": ["bogus"]}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: experts: unknown expert kind 'bogus'"):
        MoSLoraConfig.load(tmp_path)
