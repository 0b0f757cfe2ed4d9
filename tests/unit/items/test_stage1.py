import json
import logging

import numpy as np
import pytest
import torch

from merlin_molar.errors import MolarDataError
from merlin_molar.items import (
    CUR_ITEM_TOKEN,
    STAGE1_TASKS,
    ItemContent,
    Stage1Example,
    build_encoder,
    build_stage1_mixture,
    finetune,
    user_behaviour_examples,
)
from merlin_molar.items.stage1 import describe_item
from merlin_molar.items.stage1.generative import _Collator


@pytest.fixture(scope="module")
def mixture(small_prepared):
    return build_stage1_mixture(small_prepared, examples_per_task=100, seed=0)


def test_mixture_has_the_three_tasks(mixture, small_prepared, broken_images):
    counts = {t: sum(e.task == t for e in mixture) for t in STAGE1_TASKS}
    # 38 items have a readable poster (one is missing, one corrupt), 40 have text; behaviour is sampled
    assert counts == {"image_description": 38, "attribute_description": 40, "user_behaviour": 100}
    images = [e.image for e in mixture if e.task == "image_description"]
    assert len(set(images)) == 38 and not set(broken_images.values()) & set(images)
    assert all(e.prompt.endswith(CUR_ITEM_TOKEN) for e in mixture if e.task != "user_behaviour")
    assert build_stage1_mixture(small_prepared, examples_per_task=100, seed=0) == mixture


def test_description_targets_come_from_the_items_own_fields(mixture, small_prepared):
    items = small_prepared.items().set_index("image")
    for ex in (e for e in mixture if e.task == "image_description"):
        row = items.loc[ex.image]
        assert ex.target == f"{row.clean_title}. Year: {row.year}. Genres: {row.genres.replace('|', ', ')}."
    attr = next(e for e in mixture if e.task == "attribute_description")
    assert "clean_title: " in attr.prompt and "{image}" not in attr.prompt


def test_describe_item_prefers_a_real_description():
    item = ItemContent(3, (("title", "Heat"), ("genres", "Crime|Thriller")))
    assert describe_item(item) == "Heat. Genres: Crime, Thriller."
    assert describe_item(item, "A heist film.") == "A heist film."


def test_user_behaviour_follows_real_histories(mixture, small_prepared):
    from merlin_molar.ids import ITEM_SEQUENCE

    titles = dict(zip(small_prepared.items()["item_id"], small_prepared.items()["title"]))
    histories = [[titles[i] for i in h] for h in small_prepared.split_frame("train")[ITEM_SEQUENCE]]
    for ex in [e for e in mixture if e.task == "user_behaviour"][:20]:
        context = ex.prompt.split("in order: ")[1].split(". The next item")[0].split("; ")
        assert len(context) <= 10
        window = context + [ex.target]
        assert any(
            h[i : i + len(window)] == window for h in histories for i in range(len(h) - len(window) + 1)
        ), window


def test_user_behaviour_history_length():
    examples = user_behaviour_examples([[1, 2, 3, 4, 5]], {i: f"t{i}" for i in range(1, 6)}, 50, history_length=2)
    for ex in examples:
        assert 1 <= len(ex.prompt.split("order: ")[1].split(". The")[0].split("; ")) <= 2


def test_image_task_skipped_without_images(small_prepared_no_images, caplog):
    with caplog.at_level(logging.WARNING, logger="merlin_molar.items.stage1.tasks"):
        examples = build_stage1_mixture(small_prepared_no_images, examples_per_task=5)
    assert {e.task for e in examples} == {"attribute_description", "user_behaviour"}
    assert "image_description skipped" in caplog.text


def test_collator_puts_the_loss_on_target_tokens_only(vlm, poster_paths):
    examples = [
        Stage1Example("image_description", f"Describe: {{image}}. {CUR_ITEM_TOKEN}", "Heat. 1995.", poster_paths[0]),
        Stage1Example("user_behaviour", "History: a; b. Next:", "Jumanji (1995)"),
    ]
    collate = _Collator(vlm.preprocessor, "vlm", vlm.image_placeholder, 224, 512, 64)
    batch = collate(examples)
    tokenizer = vlm.tokenizer
    for row, ex in enumerate(examples):
        labels = batch["labels"][row]
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != -100].tolist() == target
        start = int((labels != -100).nonzero()[0])
        assert batch["input_ids"][row, start : start + len(target)].tolist() == target
        assert batch["attention_mask"][row].sum() == start + len(target)
    assert (batch["input_ids"][0] == vlm.preprocessor.image_token_id).sum() == 64
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, backbones, mixture):
    examples = [e for task in STAGE1_TASKS for e in [x for x in mixture if x.task == task][:2]]
    out = tmp_path_factory.mktemp("stage1") / "lora"
    finetune(backbones["qwen2_vl"], examples, out, max_steps=8, batch_size=6, learning_rate=5e-3, progress=False)
    return out


def test_lora_finetune_learns_and_saves_an_adapter(lora_dir, backbones):
    meta = json.loads((lora_dir / "molar_stage1.json").read_text())
    assert meta["method"] == "lora" and meta["kind"] == "vlm" and meta["steps"] == 8
    assert meta["examples"] == {"image_description": 2, "attribute_description": 2, "user_behaviour": 2}
    assert meta["losses"][-1] < meta["losses"][0] - 0.05
    assert (lora_dir / "adapter_config.json").exists() and (lora_dir / "adapter_model.safetensors").exists()
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [meta["cur_item_id"]]}


def test_encoder_from_adapter(lora_dir, vlm, poster_paths):
    item = ItemContent(3, (("title", "Toy Story (1995)"),), poster_paths[0])
    tuned = build_encoder(lora_dir, device="cpu")
    assert tuned.kind == "vlm" and tuned.stage1["method"] == "lora"
    base_vec, tuned_vec = vlm.encode([item]).embeddings, tuned.encode([item]).embeddings
    assert np.abs(base_vec - tuned_vec).max() > 1e-3
    trained_row = tuned.model.get_input_embeddings().weight[tuned.cur_item_id]
    assert not torch.allclose(trained_row, vlm.model.get_input_embeddings().weight[vlm.cur_item_id])
    np.testing.assert_array_equal(build_encoder(lora_dir, device="cpu").encode([item]).embeddings, tuned_vec)


def test_adapter_reloads_with_peft(lora_dir, backbones):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from merlin_molar.items.encoders import add_cur_item_token, load_preprocessor

    base = AutoModelForImageTextToText.from_pretrained(backbones["qwen2_vl"])
    add_cur_item_token(load_preprocessor(lora_dir, "vlm").tokenizer, base)
    model = PeftModel.from_pretrained(base, lora_dir)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_full_finetune_of_a_text_llm(tmp_path, backbones, mixture, caplog):
    examples = [e for e in mixture if e.task == "image_description"][:2] + [
        e for e in mixture if e.task == "attribute_description"
    ][:4]
    with caplog.at_level(logging.WARNING, logger="merlin_molar.items.stage1.generative"):
        out = finetune(backbones["qwen2"], examples, tmp_path / "full", method="full", max_steps=2, batch_size=2,
                       progress=False)
    assert "image_description examples skipped" in caplog.text
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["examples"]["image_description"] == 0 and meta["examples"]["attribute_description"] == 4
    encoder = build_encoder(out, device="cpu")
    base = build_encoder(backbones["qwen2"], device="cpu")
    item = [ItemContent(3, (("title", "Heat (1995)"),))]
    assert encoder.kind == "text-llm"
    assert np.abs(encoder.encode(item).embeddings - base.encode(item).embeddings).max() > 1e-4


def test_finetune_refuses_sentence_encoders_and_empty_mixtures(tmp_path, minilm, backbones):
    with pytest.raises(ValueError, match="LLM or vision-language backbone"):
        finetune(minilm.name_or_path, [Stage1Example("x", "p", "t")], tmp_path / "x")
    with pytest.raises(MolarDataError, match="no training examples"):
        finetune(backbones["qwen2"], [], tmp_path / "y")


# --- a decoder LLM read from a GGUF file (the packaged SmolLM2's path) or a llama directory --------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, small_prepared):
    """A random llama with a tokenizer trained on the catalogue's titles, as a model directory and as the float32
    GGUF file llama.cpp's converter would write from it."""
    from merlin_molar.items.testing import save_llama_gguf, save_random_backbone

    root = tmp_path_factory.mktemp("llama")
    titles = small_prepared.items()["title"].astype(str).tolist()
    hf_dir = save_random_backbone(root / "llama", "llama", corpus=titles + ["Describe the item from its attributes."])
    return {"dir": hf_dir, "gguf": save_llama_gguf(hf_dir, root / "tiny-llama.gguf")}


@pytest.fixture(scope="module")
def text_examples(mixture):
    return [e for task in ("attribute_description", "user_behaviour") for e in
            [x for x in mixture if x.task == task][:4]]


def test_the_test_gguf_is_the_llama_it_was_written_from(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merlin_molar.items.encoders import pretrained_location

    ids = AutoTokenizer.from_pretrained(tiny_llama["dir"])("Toy Story (1995)", return_tensors="pt")["input_ids"]
    direct = AutoModelForCausalLM.from_pretrained(tiny_llama["dir"])(ids).logits
    via_gguf = AutoModelForCausalLM.from_pretrained(**pretrained_location(tiny_llama["gguf"]))(ids).logits
    torch.testing.assert_close(via_gguf, direct)


@pytest.mark.parametrize("source", ["gguf", "dir"])
def test_lora_on_a_decoder_llm_gives_an_encoder(source, tiny_llama, text_examples, tmp_path):
    base = tiny_llama[source]
    out = finetune(base, text_examples, tmp_path / "lora", max_steps=8, batch_size=4, learning_rate=5e-3,
                   progress=False)
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["kind"] == "text-llm" and meta["method"] == "lora" and meta["base_model"] == str(base.resolve())
    assert meta["examples"] == {"image_description": 0, "attribute_description": 4, "user_behaviour": 4}
    assert meta["losses"][-1] < meta["losses"][0] - 0.05
    assert not (out / "checkpoints").exists() and (out / "adapter_model.safetensors").is_file()
    # the output is a peft adapter plus the tokenizer that knows [Cur_Item]; no GGUF is written back
    assert not list(out.glob("*.gguf")) and (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(CUR_ITEM_TOKEN) == meta["cur_item_id"]

    item = [ItemContent(3, (("title", "Toy Story (1995)"),))]
    tuned, plain = build_encoder(out, device="cpu"), build_encoder(base, device="cpu")
    assert tuned.kind == "text-llm" and tuned.stage1["method"] == "lora"
    assert tuned.describe()["base_model"] == str(base.resolve())
    assert np.abs(tuned.encode(item).embeddings - plain.encode(item).embeddings).max() > 1e-3
    row = tuned.model.get_input_embeddings().weight[tuned.cur_item_id]
    assert not torch.allclose(row, plain.model.get_input_embeddings().weight[plain.cur_item_id])
    np.testing.assert_array_equal(build_encoder(out, device="cpu").encode(item).embeddings,
                                  tuned.encode(item).embeddings)


def test_lora_output_records_the_packaged_name(monkeypatch, tiny_llama, text_examples, tmp_path):
    """``smollm2`` is recorded by name, so the adapter loads wherever the package is installed (the real file
    takes minutes to read on one CPU thread: the tiny GGUF stands in for it)."""
    import merlin_molar.items.encoders as encoders

    monkeypatch.setattr(encoders, "packaged_smollm2_path", lambda: tiny_llama["gguf"])
    out = finetune("smollm2", text_examples, tmp_path / "smol", max_steps=1, batch_size=2, progress=False)
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["base_model"] == "smollm2" and meta["base_model_file"] == str(tiny_llama["gguf"].resolve())
    assert build_encoder(out, device="cpu").describe()["base_model"] == "smollm2"


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt_at_batch(monkeypatch, n):
    """The ``n``-th batch the collator builds raises, like Ctrl-C in the middle of that step."""
    real, calls = _Collator.__call__, []

    def collate(self, examples):
        calls.append(1)
        if len(calls) == n:
            raise _Interrupt()
        return real(self, examples)

    monkeypatch.setattr(_Collator, "__call__", collate)


def _trained_tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_an_interrupted_finetune_continues_to_the_uninterrupted_result(tiny_llama, text_examples, tmp_path,
                                                                       monkeypatch, caplog):
    settings = dict(max_steps=6, batch_size=3, learning_rate=5e-3, checkpoint_every=2, progress=False)
    whole = finetune(tiny_llama["gguf"], text_examples, tmp_path / "whole", **settings)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at_batch(m, 6)  # step 6: steps 1-5 done, the checkpoint of step 4 written
        with pytest.raises(_Interrupt):
            finetune(tiny_llama["gguf"], text_examples, out, **settings)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004.pt"]
    assert not (out / "molar_stage1.json").exists()
    with caplog.at_level(logging.WARNING, logger="merlin_molar.items.stage1.generative"):
        finetune(tiny_llama["gguf"], text_examples, out, **settings)
    assert "continuing from step 4 of 6" in caplog.text
    meta, whole_meta = (json.loads((d / "molar_stage1.json").read_text()) for d in (out, whole))
    assert meta["resumed_from_step"] == 4 and whole_meta["resumed_from_step"] is None
    assert meta["losses"] == whole_meta["losses"]
    resumed, uninterrupted = _trained_tensors(out), _trained_tensors(whole)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0)
    assert not (out / "checkpoints").exists()


def test_checkpoints_of_another_run_are_refused_until_restart(tiny_llama, text_examples, tmp_path, monkeypatch):
    settings = dict(max_steps=4, batch_size=4, checkpoint_every=1, progress=False)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at_batch(m, 3)
        with pytest.raises(_Interrupt):
            finetune(tiny_llama["gguf"], text_examples, out, **settings)
    with pytest.raises(MolarDataError, match=r"another stage-1 run \(differs in \['examples', 'learning_rate'\]\)"):
        finetune(tiny_llama["gguf"], text_examples[:-1], out, learning_rate=1e-3, **settings)
    assert (out / "checkpoints" / "step-00000002.pt").is_file()  # the refusal removed nothing
    finetune(tiny_llama["gguf"], text_examples[:-1], out, learning_rate=1e-3, resume=False, **settings)
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["resumed_from_step"] is None and len(meta["losses"]) == 4


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing(tiny_llama, text_examples, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at_batch(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        finetune(tiny_llama["gguf"], text_examples, out, max_steps=4, batch_size=4, checkpoint_every=3,
                 progress=False)
    assert not out.exists()


def test_a_damaged_checkpoint_is_named(tiny_llama, text_examples, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at_batch(m, 3)
        with pytest.raises(_Interrupt):
            finetune(tiny_llama["gguf"], text_examples, out, max_steps=4, batch_size=4, checkpoint_every=2,
                     progress=False)
    checkpoint = out / "checkpoints" / "step-00000002.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(MolarDataError, match="step-00000002.pt: unreadable stage-1 checkpoint"):
        finetune(tiny_llama["gguf"], text_examples, out, max_steps=4, batch_size=4, checkpoint_every=2,
                 progress=False)


def test_finetune_items_on_a_gguf_then_embed_items(tiny_llama, small_prepared, tmp_path, capsys):
    from merlin_molar.cli import main
    from merlin_molar.items.table import read_table_metadata, read_table_rows

    out = tmp_path / "stage1"
    assert main(["finetune-items", "--prepared", str(small_prepared.root), "--base-model", str(tiny_llama["gguf"]),
                 "--output", str(out), "--examples-per-task", "6", "--max-steps", "2", "--batch-size", "3",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    meta = json.loads((out / "molar_stage1.json").read_text())
    # a text LLM gets the two text tasks (the poster task is not even built), 6 examples each
    assert meta["examples"] == {"image_description": 0, "attribute_description": 6, "user_behaviour": 6}
    assert meta["hyperparameters"]["checkpoint_every"] == 50
    table = tmp_path / "table"
    assert main(["embed-items", "--prepared", str(small_prepared.root), "--encoder", str(out), "--output", str(table),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    rows, metadata = read_table_rows(table), read_table_metadata(table)
    assert rows.has_embedding.sum() == small_prepared.items()["has_content"].sum()
    assert metadata["encoder"]["stage1"]["method"] == "lora" and metadata["encoder"]["name_or_path"] == str(out)


def test_finetune_items_interrupted_says_how_to_continue_and_continues(tiny_llama, small_prepared, tmp_path,
                                                                       monkeypatch, capsys):
    from merlin_molar.cli import main

    out = tmp_path / "stage1"
    argv = ["finetune-items", "--prepared", str(small_prepared.root), "--base-model", str(tiny_llama["gguf"]),
            "--output", str(out), "--examples-per-task", "4", "--max-steps", "3", "--batch-size", "2",
            "--checkpoint-every", "1", "--device", "cpu"]
    with monkeypatch.context() as m:
        _interrupt_at_batch(m, 3)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: run the same command again to continue from the last checkpoint" in err
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["resumed_from_step"] == 2 and len(meta["losses"]) == 3 and not (out / "checkpoints").exists()
