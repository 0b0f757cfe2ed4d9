"""`merlin-molar`: the command line. Every subcommand has --help; options may also come from a YAML or
TOML file given with --config (keys are the long option names, e.g. ``max_length: 50``; flags win)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from merlin_molar.errors import MolarDataError
from merlin_molar.validation import check_command, one_line, parse_model_options

LOG = logging.getLogger("merlin_molar")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``merlin-molar <cmd>: error: <option>: <problem>``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MolarDataError(p, "config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MolarDataError(p, "not a text file (not UTF-8)") from None
    if p.suffix in (".toml",):
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise MolarDataError(p, f"not valid TOML ({one_line(e)})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise MolarDataError(p, f"not valid YAML ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise MolarDataError(p, "expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}




def _train_config(args):
    from merlin_molar.training import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        save_steps=args.save_steps,
        early_stopping_patience=args.patience,
        eval_every=args.eval_every,
        bf16=args.bf16,
    )


def cmd_prepare(args):
    from merlin_molar.pipeline import prepare_dataset

    text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()] if args.text_columns else None
    data = prepare_dataset(args.data, args.output, max_length=args.max_length, k_core=args.k_core, fmt=args.format,
                           text_columns=text_columns, cold_items=args.cold_items)
    m = data.manifest
    left_out = m.get("users_left_out", {})
    note = (f" ({left_out['users']} user(s) with fewer than {left_out['fewer_than']} interactions left out, "
            f"{left_out['interactions']} rows)") if left_out.get("users") else ""
    print(f"prepared {m['users']} users, {m['interactions']} interactions, {m['items_interacted']} items{note}")
    if "cold_start" in m:
        c = m["cold_start"]
        print(f"held out {c['cold_items']} cold items ({c['cold_target_users']} users have one as test target); "
              f"add them with `merlin-molar add-items --prepared {data.root} --items {data.root / c['items_file']}`")
    print(f"wrote {data.root}/{{train,valid,test}}/, {data.workflow_path}, {data.items_path}")


def cmd_embed_items(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.pipeline import embed_item_table

    data = load_prepared(args.prepared)
    if args.merge:
        from merlin_molar.items import merge_shards

        out = merge_shards(args.output or data.root / "item_table", args.num_shards if args.num_shards > 1 else None)
        print(f"merged shards into item table {out}")
        return
    options = {"batch_size": args.batch_size, "shard_index": args.shard_index, "num_shards": args.num_shards}
    if args.kind:
        options["kind"] = args.kind
    if args.fusion:
        if "+" not in (args.encoder or "") and args.kind != "multimodal":
            raise MolarDataError("--fusion", "joins the parts of a TEXT+IMAGE encoder (e.g. --encoder "
                                 "minilm+efficientnet-lite0)")
        options["fusion"] = args.fusion
    if args.device:
        options["device"] = args.device
    details = {}
    out = embed_item_table(data, args.output, encoder=args.encoder, details=details, **options)
    if details["result"].reused:
        print(f"item table {out} is up to date (written by this encoder, with these prompts, for this catalogue): "
              "nothing to embed")
    elif args.num_shards > 1:
        print(f"wrote shard {args.shard_index} of {args.num_shards} under {out}.work; when every shard is done run "
              f"`merlin-molar embed-items --prepared {args.prepared} --merge --num-shards {args.num_shards}`")
    else:
        print(f"wrote item table {out}")


def cmd_add_items(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.items.add_items import add_items

    result = add_items(load_prepared(args.prepared), args.items, item_table=args.item_table,
                       images_dir=args.images, encoder=args.encoder, batch_size=args.batch_size)
    if result.added:
        print(f"added {len(result.added)} item(s) as ids {result.first_id}..{result.item_cardinality - 1}; "
              f"catalogue version {result.version} ({result.item_cardinality} ids, fingerprint "
              f"{result.id_mapping_fingerprint[:16]}); item table {result.item_table}")
    else:
        print(f"nothing to add: all {len(result.skipped)} item(s) are already in catalogue version {result.version}")


NEW_ITEM_SCORING_CHOICES = ("imputed", "quantile", "content")  # models.task.NEW_ITEM_SCORING (kept light for --help)
NEW_ITEM_TEMPERATURE = 2.0  # models.task.NEW_ITEM_TEMPERATURE (kept light for --help)


def _prior_value(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number, got {text!r}") from None


def cmd_extend_model(args):
    from merlin_molar.cold_start import extend_saved_model
    from merlin_molar.data import load_prepared

    out = extend_saved_model(args.model_dir, load_prepared(args.prepared), args.output, item_table=args.item_table,
                             new_item_scoring=args.new_item_scoring, new_item_prior=args.new_item_prior,
                             new_item_temperature=args.new_item_temperature)
    from merlin_molar.io import read_json

    extension = read_json(Path(out) / "molar_model.json")["catalogue_extension"]
    print(f"new-item prior: {extension['new_item_prior']:+.2f} (log units added to every new item's score), "
          f"temperature {extension['new_item_temperature']:g}")
    print(f"wrote {out}: {args.model_dir} scoring the catalogue of {args.prepared} (no retraining); "
          f"serve it with `merlin-molar export --model-dir {out} --prepared {args.prepared} --repository DIR`")


def cmd_evaluate_cold_start(args):
    from merlin_molar.cold_start import cold_start_evaluation, cold_start_table
    from merlin_molar.data import load_prepared

    results = cold_start_evaluation(args.model_dir, load_prepared(args.prepared), args.item_table,
                                    diagnostics=args.diagnostics)
    print(cold_start_table(results))
    if args.output:
        from merlin_molar.io import write_json

        write_json(Path(args.output), results)
        print(f"wrote {args.output}")


LLM_CHECKPOINT_EVERY = 50  # finetune-items: steps between checkpoints of an LLM/VLM stage 1


def cmd_finetune_items(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.items.encoders import detect_kind
    from merlin_molar.validation import check_stage1_options, loading

    data = load_prepared(args.prepared)
    with loading("--base-model", args.base_model or "the default encoder"):
        kind = detect_kind(args.base_model)
    check_stage1_options(args, kind)  # again: check_command could not detect the kind of a hub id
    if kind == "sentence":
        _finetune_sentence(args, data)
        return
    from merlin_molar.items import STAGE1_TASKS, Stage1Config, build_stage1_mixture, finetune

    defaults = Stage1Config()
    checkpoint_every = LLM_CHECKPOINT_EVERY if args.checkpoint_every is None else args.checkpoint_every
    args.checkpointed = checkpoint_every > 0  # an interruption from here on is told how to continue (see main)
    mixture_options = {} if args.history_length is None else {"history_length": args.history_length}
    if kind != "vlm":  # a text-only backbone cannot read the image task: do not open every poster for nothing
        mixture_options["tasks"] = tuple(t for t in STAGE1_TASKS if t != "image_description")
    examples = build_stage1_mixture(data, examples_per_task=args.examples_per_task, seed=args.seed, **mixture_options)
    out = finetune(
        args.base_model, examples, args.output, method=args.method or defaults.method, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size or defaults.batch_size,
        learning_rate=args.lr or defaults.learning_rate, device=args.device, seed=args.seed,
        checkpoint_every=checkpoint_every, resume=_resume_choice(args),
    )
    print(f"wrote fine-tuned item encoder {out} (use it with: merlin-molar embed-items --encoder {out})")


def _add_resume_options(p, same_run: str, scope: str = "") -> None:
    """--resume / --restart of a command whose --output keeps checkpoints."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help=f"{scope}continue from the last checkpoint in --output (the default anyway when it holds "
                            f"checkpoints of this same run: {same_run}; this flag also says so when there is none)")
    group.add_argument("--restart", action="store_true",
                       help=f"{scope}start from scratch, removing the checkpoints an earlier run left in --output")


def _resume_choice(args):
    """``resume`` for :func:`merlin_molar.pipeline.train` / ``finetune``: True, False (restart) or None (automatic)."""
    return True if args.resume else (False if args.restart else None)


def _finetune_sentence(args, data):
    """Stage 1 of a sentence encoder: contrastive, recent train items' text -> the next item's text."""
    from merlin_molar.items.stage1 import SentenceStage1Config, finetune_sentence_encoder, sentence_behaviour_examples

    defaults = SentenceStage1Config()
    history_length = args.history_length or 3
    examples = sentence_behaviour_examples(data, args.examples_per_task, history_length, seed=args.seed)
    source = {"prepared": str(data.root), "split": "train", "history_length": history_length,
              "examples": args.examples_per_task, "seed": args.seed}
    out = finetune_sentence_encoder(
        args.base_model, examples, args.output, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size or defaults.batch_size, learning_rate=args.lr or defaults.learning_rate,
        temperature=args.temperature or defaults.temperature, device=args.device, seed=args.seed, source=source,
    )
    print(f"wrote stage-1 sentence encoder {out} (use it with: merlin-molar embed-items --encoder {out})")


def cmd_train(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.pipeline import metrics_table, train

    data = load_prepared(args.prepared)
    result = train(
        data, args.model, args.output, parse_model_options(args.model_options), _train_config(args),
        item_table_path=args.item_table, resume=_resume_choice(args),
        init_id_branch_from=args.init_id_branch,
    )
    print(metrics_table({args.model: result}, "valid").replace("model", "valid", 1))
    print(metrics_table({args.model: result}, "test").replace("model", "test ", 1))
    print(f"wrote model {result['model_dir']}, metrics {Path(args.output) / 'metrics.json'}, "
          f"checkpoints {Path(args.output) / 'checkpoints'}")


def cmd_evaluate(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.pipeline import evaluate_saved

    metrics = evaluate_saved(args.model_dir, load_prepared(args.prepared), args.split)
    print(json.dumps(metrics, indent=2))


def cmd_recommend(args):
    from merlin_molar.data import load_prepared
    from merlin_molar.pipeline import recommend

    histories = [[h.strip() for h in history.split(",") if h.strip()] for history in args.history]
    recs = recommend(args.model_dir, load_prepared(args.prepared), histories, args.top_k, args.item_table)
    print(recs.to_string(index=False))


def cmd_export(args):
    from merlin_molar.serving import export_triton

    out = export_triton(args.model_dir, args.prepared, args.repository, top_k=args.top_k,
                        max_batch_size=args.max_batch_size, instances=args.instances,
                        torch_threads=args.torch_threads, pin_cores=args.pin_cores, overwrite=args.overwrite)
    print(f"wrote Triton model repository {out} ({args.instances} instance(s), "
          f"{args.torch_threads} torch thread(s) each{', each pinned to one core' if args.pin_cores else ''})")


def cmd_quickstart(args):
    from merlin_molar.quickstart import run_quickstart

    run_quickstart(args.data, args.workdir, epochs=args.epochs, download=not args.no_download)


def _add_train_options(p):
    from merlin_molar.training import TrainConfig

    d = TrainConfig()
    p.add_argument("--epochs", type=float, default=d.epochs,
                   help="maximum number of epochs (early stopping on validation NDCG@10 decides)")
    p.add_argument("--patience", type=int, default=d.early_stopping_patience,
                   help="stop after N validations (one every --eval-every epochs) without a better validation "
                   "NDCG@10, but not before 400 optimizer steps, and keep the best validation's weights (0: no early "
                   "stopping, train --epochs and keep the last weights)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate (and checkpoint) after every N-th epoch; --patience counts these validations")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-steps", type=int, default=200,
                   help="with --patience 0: checkpoint every N steps (0: no checkpoints); with early stopping "
                   "a checkpoint is written after every epoch")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="merlin-molar", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML or TOML file with this command's options")
        p.set_defaults(func=func)
        return p

    p = add("prepare", cmd_prepare, "raw data -> NVTabular workflow + leave-one-out train/valid/test (a user needs "
            "3 interactions: one to train on, a validation and a test target; users with fewer are left out, "
            "with a warning that counts them)")
    p.add_argument("--data", required=True, help="dataset directory (see --format)")
    p.add_argument("--format", default="auto", help="auto | csv | movielens-dat | movielens-100k | recbole")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--max-length", type=int, default=200, help="keep the last N items of each history")
    p.add_argument("--k-core", type=int, default=0, help="iteratively keep users/items with >= K interactions")
    p.add_argument("--text-columns", help="comma-separated item columns for the item text, in this order "
                   "(default: every column of the item table but item_id and image, in file order)")
    p.add_argument("--cold-items", type=float, default=0.0,
                   help="hold out this fraction of items (the latest to appear) as new items for cold-start evaluation")

    p = add("embed-items", cmd_embed_items, "MIRM: embed the item catalogue into the item feature table")
    p.add_argument("--prepared", required=True, help="directory written by `prepare`")
    p.add_argument("--encoder", help="the item encoder: minilm (default: the packaged all-MiniLM-L6-v2), smollm2 (the "
                   "packaged SmolLM2-135M-Instruct read the paper's way: hidden state at [Cur_Item]), "
                   "efficientnet-lite0 (the posters alone), TEXT+IMAGE to join a text and an image encoder (e.g. "
                   "minilm+efficientnet-lite0), or a local model directory, GGUF file or hub id")
    p.add_argument("--kind", choices=["sentence", "text-llm", "vlm", "image", "multimodal"], help="default: detected")
    p.add_argument("--fusion", choices=["whiten", "l2"],
                   help="how a TEXT+IMAGE encoder joins its parts: whiten (default; each part whitened with statistics "
                   "fitted on the catalogue, saved with the table) or l2 (each part L2-normalised as it comes)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--output", help="table directory (default: PREPARED/item_table)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1, help="split the catalogue over N processes (then --merge)")
    p.add_argument("--merge", action="store_true", help="merge finished shards into the final table")

    p = add("add-items", cmd_add_items, "add new items to the vocabulary and item table (no re-fit, no retraining)")
    p.add_argument("--prepared", required=True, help="directory written by `prepare`")
    p.add_argument("--items", required=True, help="csv (or parquet) of new items: item_id + the text columns [+ image]")
    p.add_argument("--images", help="directory that relative image paths in --items are resolved against")
    p.add_argument("--item-table", help="item table directory to extend (default: PREPARED/item_table)")
    p.add_argument("--encoder", help="must be the table's encoder (default: the one recorded in its metadata)")
    p.add_argument("--batch-size", type=int, default=32)

    p = add("extend-model", cmd_extend_model,
            "make a trained Molar model score the items added with add-items, without retraining (then export)")
    p.add_argument("--model-dir", required=True, help="a saved Molar model")
    p.add_argument("--prepared", required=True, help="the prepared directory, after add-items")
    p.add_argument("--item-table", help="the extended item table (default: PREPARED/item_table)")
    p.add_argument("--output", required=True, help="directory for the extended model")
    p.add_argument("--new-item-prior", default="auto", type=_prior_value,
                   help="log-prior offset for the new items' scores: 'auto' (default) picks the largest one whose "
                        "warm NDCG@10 cost on the validation split is within 2%%, both with the added items and in a "
                        "simulation with the latest training items; or a number (0 = none)")
    p.add_argument("--new-item-scoring", default="imputed", choices=NEW_ITEM_SCORING_CHOICES,
                   help="how a new item's missing ID score is filled in: 'imputed' (default) from an ID embedding "
                        "regressed on its content, 'quantile' the ID score at its content rank, 'content' none")
    p.add_argument("--new-item-temperature", default=NEW_ITEM_TEMPERATURE, type=float,
                   help="tempers each user's new-item scores around their total (1 = as calibrated; default "
                        f"{NEW_ITEM_TEMPERATURE:g}, chosen on MovieLens-1M validation data)")

    p = add("evaluate-cold-start", cmd_evaluate_cold_start,
            "cold vs warm test targets: a saved model and the random/popularity/content-kNN baselines")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prepared", required=True, help="prepared with --cold-items, cold items added with add-items")
    p.add_argument("--item-table", help="default: PREPARED/item_table")
    p.add_argument("--diagnostics", action="store_true",
                   help="also the model ranking only its trained catalogue, uncalibrated and content-only variants")
    p.add_argument("--output", help="write the metrics as JSON here")

    p = add("finetune-items", cmd_finetune_items,
            "MIRM stage 1: fine-tune the item encoder on the training split (LLM/VLM: generative mixture, LoRA "
            "or full; sentence encoder, the default: contrastive history -> next item)")
    p.add_argument("--prepared", required=True)
    p.add_argument("--base-model", help="local path or hub id of a VLM, a text LLM or a sentence-transformers "
                   "model, a decoder LLM's GGUF file, or smollm2 (the packaged SmolLM2-135M-Instruct GGUF; a GGUF "
                   "file is dequantised to float32 and the output is a LoRA adapter on it) (default: the packaged "
                   "all-MiniLM-L6-v2); a sentence encoder is trained contrastively: "
                   "the text of a user's last --history-length training items (newest last) against the next "
                   "item's text, in-batch negatives, every weight trained")
    p.add_argument("--output", required=True, help="model directory to write (then `embed-items --encoder` it); an "
                   "LLM/VLM run keeps its checkpoints in OUTPUT/checkpoints until it finishes")
    p.add_argument("--method", choices=["lora", "full"],
                   help="LLM/VLM: lora (default) or full; a sentence encoder is always trained fully")
    p.add_argument("--examples-per-task", type=int, default=10_000,
                   help="examples per stage-1 task (a sentence encoder has one task: history -> next item)")
    p.add_argument("--history-length", type=int,
                   help="items of history per behaviour example (default: 10 for an LLM, 3 for a sentence encoder)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the examples (unless --max-steps)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="default: 8 for an LLM, 32 for a sentence encoder (the "
                   "other examples of a batch are its negatives)")
    p.add_argument("--lr", type=float, help="default: 1e-4 for an LLM, 5e-5 for a sentence encoder")
    p.add_argument("--temperature", type=float, help="sentence encoder: InfoNCE temperature (default 0.05)")
    p.add_argument("--checkpoint-every", type=int, help=f"LLM/VLM: steps between checkpoints (default "
                   f"{LLM_CHECKPOINT_EVERY}; 0: none); an interrupted run, run again, continues from the last one")
    _add_resume_options(p, "same base model, examples and options", scope="LLM/VLM: ")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)

    p = add("train", cmd_train, "train SASRec, GRU4Rec or Molar with the Transformers4Rec Trainer, then evaluate")
    p.add_argument("--prepared", required=True)
    p.add_argument("--model", default="molar", choices=["sasrec", "gru4rec", "molar"],
                   help="sasrec / gru4rec: an ID-based sequential model; molar: content tower + ID branch")
    p.add_argument("--item-table", help="item table directory (Molar)")
    p.add_argument("--model-options", help='JSON object of model options, e.g. \'{"alpha": 0.1}\' for the paper\'s '
                   'post-alignment loss (default 0 with --init-id-branch, where it did not help in the quality '
                   'benchmarks; 0.1 for a jointly trained ID branch); \'{"llm": "smollm2", "llm_layers": 2}\' starts '
                   "Molar's DUEG from the first 2 layers of the packaged SmolLM2 (\"llm\" may also be a GGUF file or a "
                   'model directory; add \'"lora": {"r": 8}\' to train LoRA adapters on the frozen LLM instead)')
    p.add_argument("--init-id-branch",
                   help="a saved SASRec or GRU4Rec model dir: Molar's ID branch, frozen, with its architecture")
    p.add_argument("--output", required=True, help="run directory")
    _add_resume_options(p, "same data and options")
    _add_train_options(p)

    p = add("evaluate", cmd_evaluate, "full-ranking Recall/NDCG@10/20/50 of a saved model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])

    p = add("recommend", cmd_recommend, "top-k items for given histories (raw item ids)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--history", action="append", required=True, help="comma-separated raw item ids; repeatable")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--item-table", help="item table with items added after training (default: PREPARED/item_table)")

    p = add("export", cmd_export, "write a Triton model repository (raw ids -> Categorify ids -> lean model -> top-k)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--repository", required=True, help="directory to write; must not exist or be empty")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --repository when it is not empty")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-batch-size", type=int, default=256, help="most histories per request")
    p.add_argument("--instances", type=int, default=1,
                   help="Triton instances of the model (instance_group, CPU), e.g. one per core")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per instance (keep instances x threads <= cores; 0 = torch's default)")
    p.add_argument("--pin-cores", action="store_true",
                   help="bind instance i to the i-th core the server may use (keeps its tables in that core's "
                        "cache; for a machine that serves only this model)")

    p = add("quickstart", cmd_quickstart, "the whole pipeline on MovieLens on CPU, ending in a metrics table")
    p.add_argument("--data", help="MovieLens directory (default: $MOLAR_DATA, ../shared/data/ml-100k, or a download)")
    p.add_argument("--workdir", default="outputs/quickstart")
    p.add_argument("--epochs", type=float, default=None, help="override the CPU default epoch count")
    p.add_argument("--no-download", action="store_true")
    return parser


def _config_path(argv: List[str]) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _error(command: Optional[str], message: str, code: int = 2) -> int:
    print(f"merlin-molar{' ' + command if command else ''}: error: {one_line(message)}", file=sys.stderr)
    return code


def _leave_process_group(finished: bool) -> None:
    """Under ``torchrun``: :func:`merlin_molar.distributed.leave_process_group` (a process that exits still in
    its gloo group can abort after finishing its work). A command that never imported torch joined no group, and
    is spared the import."""
    if "torch" in sys.modules:
        from merlin_molar.distributed import leave_process_group

        leave_process_group(wait_for_peers=finished)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. A user error prints one line (``merlin-molar <cmd>: error: <file or option>:
    <problem>``) and returns 2; the traceback is printed only with ``--verbose``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    command = next((token for token in argv if token in subparsers), None)
    config_file = _config_path(argv)
    if command and config_file:
        try:
            values = _load_config_file(config_file)
        except MolarDataError as e:
            return _error(command, f"--config {e}")
        sub = subparsers[command]
        unknown = sorted(set(values) - {a.dest for a in sub._actions} - {"help"})
        if unknown:
            return _error(command, f"--config {config_file}: unknown option(s) {unknown}")
        sub.set_defaults(**values)
        for action in sub._actions:  # an option given in the file is no longer required on the line
            if action.dest in values:
                action.required = False
    args = parser.parse_args(argv)
    for action in subparsers[args.command]._actions:  # argparse checks choices on the line, not from --config
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            return _error(args.command, f"--config {config_file}: {action.dest} must be one of "
                                        f"{sorted(action.choices)}, got {value!r}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import merlin_molar  # noqa: F401  (compat layer)

    start = time.perf_counter()
    finished = False
    try:
        check_command(args)
        args.func(args)
        finished = True
    except MolarDataError as e:
        if args.verbose:
            traceback.print_exc()
        return _error(args.command, str(e))
    except OSError as e:  # the file system's errors name their file
        if args.verbose:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        return _error(args.command, f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        if args.command == "train" or (args.command == "finetune-items" and getattr(args, "checkpointed", False)):
            return _error(args.command, "interrupted: run the same command again to continue from the last "
                                        "checkpoint (--restart starts over)", 130)
        return _error(args.command, "interrupted (outputs written so far are complete; rerun to continue)", 130)
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        return _error(
            args.command,
            f"unexpected {type(e).__name__}: {e} (not a known input problem: please report it; "
            "--verbose prints the traceback)",
            1,
        )
    finally:
        _leave_process_group(finished)
    LOG.info("%s finished in %.1f s", args.command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
