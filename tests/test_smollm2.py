"""The adapter on the real SmolLM2-135M-Instruct (the cached conversion of the embedded GGUF)."""

import pytest
import torch

from moslora import MoSLoraConfig, MoSLoraModel, get_moslora_model
from moslora.data import CausalLMCollator, load_examples, tokenize_for_training
from moslora.hub import load_model_and_tokenizer

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    return load_model_and_tokenizer(None)


def test_smollm2_adapter_identity_train_and_reload(smollm2, data_dir, tmp_path):
    base, tokenizer = smollm2
    rows = [
        tokenize_for_training(e, tokenizer, 256)
        for e in load_examples("mawps", "train", limit=4, for_training=True)
    ]
    batch = CausalLMCollator(tokenizer)(rows)
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    model = get_moslora_model(base, MoSLoraConfig(experts=["euclidean", "hyperbolic", "spherical"]))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            expected,
        )
    model.calibrate_input_scale(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss + 0.01 * model.router_aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(tuned, expected)
    model.save_pretrained(tmp_path)
    fresh, _ = load_model_and_tokenizer(None)
    reloaded = MoSLoraModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        again = reloaded(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert torch.equal(again, tuned)
