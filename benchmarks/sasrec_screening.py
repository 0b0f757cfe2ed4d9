"""SASRec screening (issue 28): one variant, one seed, validation NDCG@10 every 5 epochs and no early stopping, to
find what makes the project's SASRec trail the plain PyTorch reference (``../shared/reference/ref_sasrec.py``).

Variants, all under the project's own inputs (Transformers4Rec item-id features, causal masking), task (weight-tied
full softmax) and Trainer, on the project's preparation of the data:

* ``--block gpt2`` (default): the project's SASRec, :func:`merlin_molar.pipeline.build_model` with ``--model``
  options (``{"positions": "last", "scale_embeddings": true}``, ...);
* ``--block encoder``: the reference's architecture as a Transformers4Rec block, ``SASRecConfig(block="encoder")``
  (:class:`merlin_molar.models.sasrec.SASRecEncoder`: PyTorch's pre-norm ``TransformerEncoder`` with GELU and a
  4d feed-forward, item embeddings x sqrt(d), learned positions counted back from the read-out item, a final
  LayerNorm), with PyTorch's initialisation (``--init torch``) or GPT-2's (``--init gpt2``: N(0, 0.02), residual
  projections 0.02/sqrt(2 layers), zero biases), and ``--ff-dropout`` after the feed-forward activation.
  (The first encoder runs used this script's own copy of the block, with the same layers; its checkpoints name
  the modules ``enc``/``pos`` and do not load into the project's block.)

``--masking-check RUN_DIR`` evaluates a trained ``encoder`` run under the project's evaluation and under the
reference's, with the seen items masked over the whole history or only over the model's window.

``--equivalence`` instead checks that the ``encoder`` block under the project's pipeline computes the reference's
loss: the reference model is given the same weights and the same batch (left-padded, as it pads) and both losses
are written (dropout off).

Writes ``benchmarks/results/sasrec_screening/<name>.json``. Example::

    python benchmarks/sasrec_screening.py encoder_torch_init --block encoder --epochs 100
    python benchmarks/sasrec_screening.py equivalence --equivalence
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, data_dir, machine, result_path, write_result  # noqa: E402

REFERENCE = REPO.parent / "shared" / "reference" / "ref_sasrec.py"
BENCHMARK = "sasrec_screening"


def build(args, prepared):
    """The variant's model: ``--block gpt2`` with the ``--model`` options, or ``--block encoder``
    (``SASRecConfig(block="encoder")``, the reference's layers) started from ``--init`` with ``--ff-dropout``."""
    import torch

    from merlin_molar.pipeline import build_model

    torch.manual_seed(args.seed)
    options = json.loads(args.model)
    if args.block == "encoder":
        options["block"] = "encoder"
    model = build_model("sasrec", prepared, options)[0]
    if args.block == "gpt2":
        return model
    block = model.heads[0].body[1]
    for layer in block.encoder.layers:
        if args.ff_dropout is not None:  # the dropout after the feed-forward activation (GPT-2's MLP has none)
            layer.dropout.p = args.ff_dropout
        if args.init == "gpt2":  # N(0, 0.02), residual projections 0.02/sqrt(2 layers), zero biases
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    if p.dim() == 2:
                        residual = "out_proj" in name or "linear2" in name
                        torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * len(block.encoder.layers)) if residual
                                              else 0.02)
                    elif "norm" not in name:
                        torch.nn.init.zeros_(p)
    return model


def load_reference(path: Path):
    """The reference script as a module (run as an external yardstick; nothing of it is copied)."""
    spec = importlib.util.spec_from_file_location("ref_sasrec", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    return reference


def reference_with_weights(reference, model, order=None):
    """The reference's SASRec holding the weights of ``model`` (an ``encoder``-block model): its item table
    (rows reordered by ``order``, the reference's code -> project id, when given), positions and layers."""
    import torch

    table = model.heads[0].body.inputs.categorical_module.item_embedding_table
    block = model.heads[0].body[1]
    items = table.weight if order is None else table.weight[order]
    ref = reference.SASRec(len(items) - 1, items.shape[1], len(block.encoder.layers), 1,
                           block.positions.num_embeddings, 0.2)
    with torch.no_grad():
        ref.item.weight.copy_(items)
        if order is not None:
            ref.item.weight[0].zero_()
        ref.pos.weight.copy_(block.positions.weight)
        ref.enc.load_state_dict(block.encoder.state_dict())
        ref.norm.load_state_dict(block.norm.state_dict())
    return ref.eval(), block


def equivalence(args, prepared) -> dict:
    """The ``encoder`` block's loss and the reference's on the same weights and batch."""
    import torch
    import torch.nn.functional as F

    from merlin_molar.training import TrainConfig, make_trainer

    reference = load_reference(args.reference)
    args.block = "encoder"
    model = build(args, prepared)
    trainer = make_trainer(model, prepared, args.workdir / "equivalence", TrainConfig(seed=args.seed, epochs=1))
    features, targets = next(iter(trainer.get_train_dataloader()))
    model(features, targets=targets, training=True)  # builds the task
    ref, block = reference_with_weights(reference, model)
    model.eval()
    with torch.no_grad():
        project_loss = float(model(features, targets=targets, training=True)["loss"])
        rows = [s[s != 0].tolist() for s in features["item_id-list"]]
        x = reference.left_pad([r[:-1] for r in rows], block.positions.num_embeddings)
        y = reference.left_pad([r[1:] for r in rows], block.positions.num_embeddings)
        keep = y > 0
        reference_loss = float(F.cross_entropy(ref.scores(ref(x)[keep]), y[keep]))
    return {"project_pipeline_loss": project_loss, "reference_loss": reference_loss, "targets": int(keep.sum()),
            "abs_difference": abs(project_loss - reference_loss)}


def masking_check(args, prepared) -> dict:
    """Validation NDCG@10 of one trained ``encoder`` block (``--masking-check``: a run directory of this script)
    under the project's evaluation, and under the reference's evaluation of the same weights (the reference model
    given them, the item ids mapped) with the seen items masked four ways: the whole history or only the items in
    the model's window, the window holding ``max_length`` or ``max_length - 1`` history items."""
    import pandas as pd
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from merlin_molar.training import TrainConfig, evaluate, make_trainer

    reference = load_reference(args.reference)
    checkpoint = Path(get_last_checkpoint(str(args.masking_check)))
    args.block = "encoder"
    model = build(args, prepared)
    trainer = make_trainer(model, prepared, args.workdir / "masking_check", TrainConfig(seed=args.seed, epochs=1))
    features, targets = next(iter(trainer.get_train_dataloader()))
    model(features, targets=targets, training=True)  # builds the task
    state = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    project = evaluate(trainer, prepared, "valid")["ndcg@10"]

    seqs, n_items = reference.load(str(args.dataset))
    raw = pd.read_csv(args.dataset / "interactions.csv")
    codes = {item: i + 1 for i, item in enumerate(sorted(raw.item_id.unique()))}  # the reference's item codes
    items = prepared.items()
    project_id = dict(zip(items["item_id_raw"], items["item_id"]))
    order = torch.zeros(n_items + 1, dtype=torch.long)
    for item, code in codes.items():
        order[code] = int(project_id[item])
    ref, block = reference_with_weights(reference, model, order)

    @torch.no_grad()
    def ndcg(window: int, mask_all: bool) -> float:
        total = 0.0
        for b in range(0, len(seqs), 512):
            histories = [s[:-2] for s in seqs[b:b + 512]]
            target = torch.tensor([s[-2] for s in seqs[b:b + 512]])
            window_ids = reference.left_pad([h[-window:] for h in histories], block.positions.num_embeddings)
            scores = ref.scores(ref(window_ids)[:, -1])
            scores[:, 0] = -float("inf")
            for row, history in enumerate(histories):
                scores[row, torch.as_tensor(history if mask_all else history[-window:])] = -float("inf")
            rank = (scores > scores.gather(1, target[:, None])).sum(1)
            total += float(((rank < 10).float() / torch.log2(rank.float() + 2)).sum())
        return total / len(seqs)

    length = block.positions.num_embeddings
    return {"checkpoint": str(checkpoint), "project_evaluation": project,
            "reference_evaluation": {
                f"window {length}, whole history masked (the reference's)": ndcg(length, True),
                f"window {length - 1}, whole history masked": ndcg(length - 1, True),
                f"window {length - 1}, only the window masked (the project's)": ndcg(length - 1, False),
                f"window {length}, only the window masked": ndcg(length, False)}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", help="the variant's name (its result file and run directory)")
    p.add_argument("--block", choices=["gpt2", "encoder"], default="gpt2")
    p.add_argument("--init", choices=["torch", "gpt2"], default="torch", help="initialisation of --block encoder")
    p.add_argument("--model", default="{}", help="SASRecConfig options as JSON")
    p.add_argument("--ff-dropout", type=float, default=None,
                   help="--block encoder: dropout after the feed-forward activation (default: the model's dropout)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", type=Path, default=data_dir("ml-100k"))
    p.add_argument("--max-length", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / BENCHMARK)
    p.add_argument("--reference", type=Path, default=REFERENCE, help="for --equivalence")
    p.add_argument("--equivalence", action="store_true", help="check the encoder block against the reference")
    p.add_argument("--resume", action="store_true", help="continue the variant's run from its last checkpoint")
    p.add_argument("--masking-check", type=Path, metavar="RUN_DIR",
                   help="evaluate this encoder-block run's last checkpoint under both masking rules")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import merlin_molar  # noqa: F401  (compat overrides before T4Rec is imported)
    from sasrec_parity import prepared_data
    from transformers.trainer_utils import get_last_checkpoint

    from merlin_molar.training import BEST_MODEL_METRIC, TrainConfig, make_trainer

    info = machine()
    prepared = prepared_data(args.dataset, args.workdir / f"{args.dataset.name}_L{args.max_length}" / "prepared",
                             args.max_length)
    if args.masking_check:
        write_result(result_path(BENCHMARK, f"{args.name}.json"), {"benchmark": BENCHMARK, "machine": info,
                                                                    "masking": masking_check(args, prepared)})
        return
    if args.equivalence:
        write_result(result_path(BENCHMARK, f"{args.name}.json"), {"benchmark": BENCHMARK, "machine": info,
                                                                    "equivalence": equivalence(args, prepared)})
        return
    model = build(args, prepared)
    out = args.workdir / "runs" / args.name
    config = TrainConfig(epochs=args.epochs, early_stopping_patience=100_000, eval_every=5, seed=args.seed,
                         logging_steps=10**6)
    trainer = make_trainer(model, prepared, out, config)
    start = time.time()
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(out)) if args.resume else None)
    key = "eval_" + BEST_MODEL_METRIC
    curve = {str(round(h["epoch"])): round(h[key], 4) for h in trainer.state.log_history if key in h}
    path = write_result(result_path(BENCHMARK, f"{args.name}.json"), {
        "benchmark": BENCHMARK, "machine": info, "dataset": str(args.dataset), "max_length": args.max_length,
        "variant": {"block": args.block, "init": args.init if args.block == "encoder" else "gpt2",
                    "ff_dropout": args.ff_dropout,
                    "model": json.loads(args.model)},
        "seed": args.seed, "epochs": args.epochs, "seconds": round(time.time() - start),
        "valid_ndcg@10_by_epoch": curve})
    print(json.dumps(curve), f"-> {path}")


if __name__ == "__main__":
    main()
