"""Adapter injection into tiny transformers models: identity at init, save/reload, adapters."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, randomise_adapter, tiny_model

from moslora import MoSLoraConfig, MoSLoraModel, get_moslora_model
from moslora.config import CONFIG_NAME, WEIGHTS_NAME
from moslora.layer import MoSLoraLinear

ARCHITECTURES = ["llama", "qwen2", "mistral"]
EXPERT_SETS = [
    ["euclidean"],
    ["hyperbolic"],
    ["euclidean", "hyperbolic", "spherical"],
    ["spherical", "spherical", "free"],
]


def _inputs(seed=0, batch=2, length=9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def _config(experts, **overrides):
    return MoSLoraConfig(experts=experts, r=4, lora_alpha=8, lora_dropout=0.0, **overrides)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("experts", EXPERT_SETS)
def test_output_unchanged_at_init(architecture, experts):
    ids = _inputs()
    expected = tiny_model(architecture)(ids).logits
    model = get_moslora_model(tiny_model(architecture), _config(experts))
    assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("experts", EXPERT_SETS)
def test_save_reload_identical_logits(tmp_path, architecture, experts):
    model = get_moslora_model(tiny_model(architecture), _config(experts)).eval()
    randomise_adapter(model)
    ids = _inputs(1)
    expected = model(ids).logits
    assert not torch.equal(expected, tiny_model(architecture)(ids).logits)
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["experts"] == experts
    reloaded = MoSLoraModel.from_pretrained(tiny_model(architecture), tmp_path)
    assert torch.equal(reloaded(ids).logits, expected)


def test_saved_file_holds_only_adapter_tensors(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic"]))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert all(".moslora_" in key for key in keys)
    assert not any("default" in key for key in keys)
    # q, k, v, up and down in 2 layers, 5 or 6 tensors each (router weight and bias).
    assert len(keys) == 2 * 5 * 6


def test_reload_in_new_process_identical_logits(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic", "spherical"]))
    randomise_adapter(model)
    model.eval()
    ids = _inputs(2)
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    script = f"""
import sys, torch
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from tiny_models import tiny_model
from moslora import MoSLoraModel
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = MoSLoraModel.from_pretrained(tiny_model(), {str(tmp_path / "adapter")!r})
assert torch.equal(model(expected["ids"]).logits, expected["logits"]), "logits differ"
print("identical")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout


def test_base_frozen_and_only_adapter_trainable():
    model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".moslora_" in name for name in trainable)
    count, total = model.get_nb_trainable_parameters()
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < count < total


def test_print_trainable_parameters(capsys):
    model = get_moslora_model(tiny_model(), _config(["euclidean"]))
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    count, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {count:,d}" in printed
    assert f"all params: {total:,d}" in printed


def test_target_modules_regex():
    config = _config(["euclidean"], target_modules=r".*\.0\.self_attn\.(q|v)_proj")
    model = get_moslora_model(tiny_model(), config)
    paths = [path for path, _ in model.named_adapter_layers()]
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_target_modules_no_match_lists_linear_names():
    with pytest.raises(ValueError, match="matched no module") as error:
        get_moslora_model(tiny_model(), _config(["euclidean"], target_modules=["query"]))
    assert "q_proj" in str(error.value)
    assert "down_proj" in str(error.value)


def test_target_modules_non_linear_match_rejected():
    with pytest.raises(ValueError, match="only torch.nn.Linear"):
        get_moslora_model(tiny_model(), _config(["euclidean"], target_modules=["mlp"]))


def test_named_adapters_do_not_collide(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]), adapter_name="first")
    model.add_adapter("second", _config(["euclidean", "spherical"]))
    assert model.active_adapter == "first"
    randomise_adapter(model, seed=3)
    ids = _inputs(3)
    first = model(ids).logits
    model.set_adapter("second")
    second = model(ids).logits
    assert not torch.equal(first, second)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".second" in name for name in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "first" / WEIGHTS_NAME).is_file()
    assert (tmp_path / "second" / WEIGHTS_NAME).is_file()
    reloaded = MoSLoraModel.from_pretrained(tiny_model(), tmp_path / "first", adapter_name="first")
    reloaded.load_adapter(tmp_path / "second", "second")
    assert torch.equal(reloaded(ids).logits, first)
    reloaded.set_adapter("second")
    assert torch.equal(reloaded(ids).logits, second)


def test_disable_adapter_gives_base_output():
    model = get_moslora_model(tiny_model(), _config(["hyperbolic", "spherical"]))
    randomise_adapter(model)
    ids = _inputs(4)
    with model.disable_adapter():
        disabled = model(ids).logits
    assert torch.equal(disabled, tiny_model()(ids).logits)
    assert not torch.equal(model(ids).logits, disabled)


def test_delete_adapter_restores_previous():
    model = get_moslora_model(tiny_model(), _config(["euclidean"]), adapter_name="a")
    model.add_adapter("b", _config(["hyperbolic"]))
    model.delete_adapter("a")
    assert model.active_adapter == "b"
    assert all("a" not in layer.adapter_configs for layer in model.adapter_layers())


def test_merge_and_unload_euclidean_exact():
    model = get_moslora_model(tiny_model(), _config(["euclidean"])).eval()
    randomise_adapter(model)
    ids = _inputs(5)
    expected = model(ids).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(module, MoSLoraLinear) for module in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "experts", [["hyperbolic"], ["euclidean", "spherical"], ["euclidean", "euclidean"]]
)
def test_merge_and_unload_rejects_nonlinear_adapter(experts):
    model = get_moslora_model(tiny_model(), _config(experts))
    randomise_adapter(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot merge"):
        model.merge_and_unload()
    # Nothing changed: the adapter is still in place and the base weights are untouched.
    assert any(isinstance(module, MoSLoraLinear) for module in model.modules())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])


def test_unload_returns_base_model():
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    randomise_adapter(model)
    ids = _inputs(6)
    base = model.unload()
    assert torch.equal(base(ids).logits, tiny_model()(ids).logits)


def test_router_aux_loss_accessor():
    model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic", "spherical"]))
    assert model.router_aux_loss() is None
    model(_inputs())
    loss = model.router_aux_loss()
    assert loss.requires_grad
    assert 1.0 <= float(loss.detach()) <= 3.0
    stats = model.routing_statistics()
    assert len(stats) == 10
    assert all(len(entry["mean_probability"]) == 3 for entry in stats.values())


def test_single_expert_has_no_aux_loss():
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    model(_inputs())
    assert model.router_aux_loss() is None


def test_mean_curvature_by_kind():
    config = _config(
        ["euclidean", "hyperbolic", "spherical"],
        init_curvature={"hyperbolic": -0.3, "spherical": 0.7},
    )
    model = get_moslora_model(tiny_model(), config)
    means = model.mean_curvature_by_kind()
    assert set(means) == {"hyperbolic", "spherical"}
    assert abs(means["hyperbolic"] + 0.3) < 1e-6
    assert abs(means["spherical"] - 0.7) < 1e-6


def test_calibrate_input_scale_sets_median_norm():
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    ids = _inputs(7, batch=4, length=16)
    scales = model.calibrate_input_scale(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert len(scales) == 10
    layer = model.base_model.get_submodule("model.layers.1.mlp.down_proj")
    captured = {}
    handle = layer.base_layer.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with model.disable_adapter():
        model(ids)
    handle.remove()
    expected = captured["x"].norm(dim=-1).flatten().median()
    torch.testing.assert_close(layer.input_scale(), expected, rtol=1e-5, atol=1e-6)


def test_load_rejects_other_base_model(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    model.save_pretrained(tmp_path)
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    other = tiny_config()
    other.hidden_size = 48
    with pytest.raises(ValueError, match="made for another base model"):
        MoSLoraModel.from_pretrained(AutoModelForCausalLM.from_config(other), tmp_path)


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    model.save_pretrained(tmp_path)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MoSLoraModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        MoSLoraModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MoSLoraModel.from_pretrained(tiny_model(), tmp_path)


def test_load_rejects_missing_tensor(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state.pop(next(iter(state)))
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="1 tensor\\(s\\) missing"):
        MoSLoraModel.from_pretrained(tiny_model(), tmp_path)


def test_loaded_adapter_frozen_unless_trainable(tmp_path):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"]))
    model.save_pretrained(tmp_path)
    frozen = MoSLoraModel.from_pretrained(tiny_model(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = MoSLoraModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_training_step_changes_adapter_only():
    model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic", "spherical"]))
    model.train()
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _inputs(8)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss + 0.01 * model.router_aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(
        torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad
    )
    layer = next(model.adapter_layers())
    assert layer.moslora_B["default"].abs().sum() > 0


def test_gradient_checkpointing_keeps_gradients():
    # Non-reentrant checkpointing gives the same loss and adapter gradients, aux loss included.
    def gradients(checkpointing):
        model = get_moslora_model(tiny_model(), _config(["euclidean", "hyperbolic", "spherical"]))
        randomise_adapter(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        ids = _inputs(9)
        loss = model(input_ids=ids, labels=ids).loss + model.router_aux_loss()
        loss.backward()
        return float(loss.detach()), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
        }

    plain_loss, plain = gradients(False)
    checkpointed_loss, checkpointed = gradients(True)
    assert abs(plain_loss - checkpointed_loss) < 1e-6
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
    router_grads = [grad for name, grad in checkpointed.items() if "moslora_router" in name]
    assert all(grad.abs().sum() > 0 for grad in router_grads)


def _shared_model(**overrides):
    config = _config(
        ["euclidean", "hyperbolic", "spherical"],
        share_router=True,
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        **overrides,
    )
    model = get_moslora_model(tiny_model(), config)
    randomise_adapter(model)
    return model


def test_shared_router_one_evaluation_per_group():
    model = _shared_model()
    attention = model.base_model.model.layers[0].self_attn
    router = attention.q_proj.moslora_router["default"]
    assert attention.k_proj.moslora_router["default"] is router
    assert attention.v_proj.moslora_router["default"] is router
    mlp = model.base_model.model.layers[0].mlp
    assert mlp.gate_proj.moslora_router["default"] is mlp.up_proj.moslora_router["default"]
    assert mlp.down_proj.moslora_router["default"] is not mlp.up_proj.moslora_router["default"]
    calls = []
    routers = {
        id(layer.moslora_router["default"]): layer.moslora_router["default"]
        for layer in model.adapter_layers()
    }
    handles = [r.register_forward_hook(lambda *args: calls.append(1)) for r in routers.values()]
    model(_inputs())
    for handle in handles:
        handle.remove()
    # Per layer: one for q/k/v, one for gate/up, one for down_proj.
    assert len(routers) == 2 * 3
    assert len(calls) == 2 * 3
    with_aux = [layer for layer in model.adapter_layers() if layer.aux_loss is not None]
    assert len(with_aux) == 2 * 3


def test_shared_router_matches_separate_routers_with_same_weights():
    shared = _shared_model()
    separate = get_moslora_model(
        tiny_model(),
        _config(
            ["euclidean", "hyperbolic", "spherical"],
            target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    separate.load_state_dict(shared.state_dict())
    ids = _inputs(10)
    assert torch.equal(shared(ids).logits, separate(ids).logits)


def test_shared_router_under_gradient_checkpointing():
    def gradients(checkpointing):
        model = _shared_model()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        ids = _inputs(11)
        loss = model(input_ids=ids, labels=ids).loss + model.router_aux_loss()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_shared_router_save_reload(tmp_path):
    model = _shared_model().eval()
    ids = _inputs(12)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = MoSLoraModel.from_pretrained(tiny_model(), tmp_path)
    attention = reloaded.base_model.model.layers[1].self_attn
    assert attention.q_proj.moslora_router["default"] is attention.v_proj.moslora_router["default"]
    assert torch.equal(reloaded(ids).logits, expected)


def test_shared_router_generation_matches_separate():
    shared = _shared_model().eval()
    separate = get_moslora_model(
        tiny_model(),
        _config(
            ["euclidean", "hyperbolic", "spherical"],
            target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ).eval()
    separate.load_state_dict(shared.state_dict())
    ids = _inputs(13, batch=2, length=5)
    with torch.inference_mode():
        first = shared.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        second = separate.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(first, second)


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = get_moslora_model(tiny_model(), _config(["hyperbolic"])).eval()
    randomise_adapter(model, seed=1)
    ids = _inputs(14)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    randomise_adapter(model, seed=2)

    import moslora.files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(moslora.files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    reloaded = MoSLoraModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(reloaded(ids).logits, expected)


def test_save_from_full_state_dict_matches_local(tmp_path):
    model = get_moslora_model(
        tiny_model(), _config(["euclidean", "hyperbolic", "spherical"], share_router=True)
    )
    randomise_adapter(model)
    local = model.adapter_state_dict()
    gathered = model.adapter_state_dict(full_state_dict=model.state_dict())
    assert local.keys() == gathered.keys()
    assert all(torch.equal(local[key], gathered[key]) for key in local)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    assert torch.equal(
        MoSLoraModel.from_pretrained(tiny_model(), tmp_path)(_inputs()).logits,
        model.eval()(_inputs()).logits,
    )
