"""MolarBlock in an ordinary Transformers4Rec pipeline, in place of TransformerBlock.

    python examples/plugin_in_t4rec.py --data ../shared/data/ml-100k

The usual T4Rec recipe is `TabularSequenceFeatures.from_schema(...) >> TransformerBlock(XLNetConfig...)`
with a `NextItemPredictionTask`. Here the input block's item embeddings come from the MIRM item table and
the transformer is a Hugging Face decoder LLM run by MolarBlock; the head, Trainer and metrics are T4Rec's.
"""
import argparse
import os
import tempfile
from pathlib import Path

import torch

# merlin_molar first: it applies the compatibility layer without which transformers4rec.torch 23.12 does
# not even import on transformers >= 4.53.
from merlin_molar import MolarBlock, content_item_inputs, prepare, read_dataset, small_decoder_config
import transformers4rec.torch as tr  # noqa: E402  (after merlin_molar, see above)
from transformers4rec.config.trainer import T4RecTrainingArguments  # noqa: E402
from merlin_molar.pipeline import embed_item_table


DATA_ROOT = Path(os.environ.get("MOLAR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA_ROOT / "ml-100k"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--epochs", type=float, default=3)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="molar-plugin-"))

    data = prepare(read_dataset(args.data), workdir / "prepared", max_length=50)
    from merlin_molar.items import load_item_table

    item_table = load_item_table(embed_item_table(data, batch_size=64), data)   # [n_items, 384] MiniLM

    llm = small_decoder_config("qwen2", hidden_size=64, num_layers=2)   # or a pretrained Qwen2/Llama path
    inputs = content_item_inputs(data.schema, item_table, d_model=llm.hidden_size, max_length=50)
    body = tr.SequentialBlock(inputs, MolarBlock(llm))                  # <- in place of tr.TransformerBlock
    head = tr.Head(body, tr.NextItemPredictionTask(weight_tying=True, metrics=[
        tr.ranking_metric.NDCGAt(top_ks=[10, 20], labels_onehot=True),
        tr.ranking_metric.RecallAt(top_ks=[10, 20], labels_onehot=True)]), inputs=inputs)
    model = tr.Model(head)

    args_t4r = T4RecTrainingArguments(
        output_dir=str(workdir / "run"), max_sequence_length=50, data_loader_engine="merlin",
        num_train_epochs=args.epochs, per_device_train_batch_size=64, per_device_eval_batch_size=128,
        learning_rate=1e-3, report_to=[], save_strategy="no",
    )
    trainer = tr.Trainer(model=model, args=args_t4r, schema=data.schema,
                         train_dataset_or_path=str(data.split_path("train")),
                         eval_dataset_or_path=str(data.split_path("valid")), compute_metrics=True)
    torch.manual_seed(0)
    trainer.train()
    print({k: round(v, 4) for k, v in trainer.evaluate().items() if "at_" in k})
    print("note: T4Rec's own metrics do not mask the user's history; merlin_molar.FullRankingNextItemTask does.")


if __name__ == "__main__":
    main()
