"""Molar's DUEG started from the packaged SmolLM2-135M-Instruct (its GGUF file is read and dequantised: about
1-2 minutes on one CPU thread), cut to its first 2 layers, with LoRA: trained a step, saved, and reloaded without
the GGUF file."""
import torch

import merlin_molar.models.dueg as dueg
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.persistence import load_model, save_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_a_smollm2_dueg_trains_and_reloads_without_its_gguf_file(tiny_prepared, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = MolarConfig(llm="smollm2", llm_layers=2, lora=LORA, max_length=20,
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, max_length=20))
    table = torch.randn(tiny_prepared.item_cardinality, 24)
    model = molar_model(tiny_prepared.schema, table, config)
    base = model.heads[0].body.content[1].llm.get_base_model()
    assert (base.config.model_type, base.config.hidden_size, len(base.layers)) == ("llama", 576, 2)
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)

    batch = {"item_id-list": torch.randint(1, tiny_prepared.item_cardinality, (4, 20))}
    model.train()
    model(dict(batch), training=True)["loss"].backward()
    with torch.no_grad():  # move the adapters off their zero start so the reload has something to keep
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))

    saved = save_model(model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)

    def no_reading(*args, **kwargs):
        raise AssertionError("the saved model read the pretrained LLM again")

    monkeypatch.setattr(dueg, "load_pretrained_llm", no_reading)
    reloaded, _, saved_config, _ = load_model(saved)
    assert saved_config.llm_source == "smollm2" and saved_config.llm["num_hidden_layers"] == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(dict(batch)), model(dict(batch)), rtol=0, atol=0)
