"""Checks of user input that run before any output is claimed or written.

Every check raises :class:`MolarDataError` naming the option (``--epochs``) or the file, so that the command
line can print its one-line error; nothing here writes anything (the write probe removes its own file).

    >>> check_options(argparse.Namespace(epochs=-1))                     # doctest: +SKIP
    MolarDataError: --epochs: must be greater than 0, got -1
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Optional

from merlin_molar.errors import MolarDataError


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (line breaks and runs of blanks become one space), cut at ``limit`` characters."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# dest -> (option, test, what the value must be)
RULES = {
    "epochs": ("--epochs", lambda v: _finite(v) and v > 0, "must be greater than 0"),
    "batch_size": ("--batch-size", lambda v: v >= 1, "must be at least 1"),
    "max_length": ("--max-length", lambda v: v >= 2, "must be at least 2 (one history item and one target)"),
    "top_k": ("--top-k", lambda v: v >= 1, "must be at least 1"),
    "k_core": ("--k-core", lambda v: v >= 0, "must be 0 (no filter) or more"),
    "save_steps": ("--save-steps", lambda v: v >= 0, "must be 0 (no checkpoints) or more"),
    "checkpoint_every": ("--checkpoint-every", lambda v: v >= 0, "must be 0 (no checkpoints) or more"),
    "patience": ("--patience", lambda v: v >= 0, "must be 0 (no early stopping) or more"),
    "eval_every": ("--eval-every", lambda v: v >= 1, "must be at least 1"),
    "lr": ("--lr", lambda v: _finite(v) and v > 0, "must be greater than 0"),
    "seed": ("--seed", lambda v: 0 <= v < 2**32, "must be between 0 and 2**32 - 1"),
    "num_shards": ("--num-shards", lambda v: v >= 1, "must be at least 1"),
    "shard_index": ("--shard-index", lambda v: v >= 0, "must be 0 or more"),
    "examples_per_task": ("--examples-per-task", lambda v: v >= 1, "must be at least 1"),
    "max_steps": ("--max-steps", lambda v: v >= 1, "must be at least 1"),
    "history_length": ("--history-length", lambda v: v >= 1, "must be at least 1"),
    "temperature": ("--temperature", lambda v: _finite(v) and v > 0, "must be greater than 0"),
    "new_item_temperature": ("--new-item-temperature", lambda v: _finite(v) and v > 0, "must be greater than 0"),
}
INTEGER_OPTIONS = set(RULES) - {"epochs", "lr", "temperature", "new_item_temperature"}
# dest -> option, for the options that name a directory the command writes
OUTPUTS = {"output": "--output", "repository": "--repository", "workdir": "--workdir"}
MODEL_PATHS = {"encoder": "--encoder", "base_model": "--base-model"}
MODEL_FILES = ("config.json", "modules.json", "molar_stage1.json")


def check_options(args) -> None:
    """Range checks of the numeric options present on ``args`` (an argparse namespace); a whole number
    given as a float (``max_length: 20.0`` in a config file) becomes an int."""
    for dest, (option, ok, must) in RULES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MolarDataError(option, f"must be a number, got {value!r}")
        if dest in INTEGER_OPTIONS and not float(value).is_integer():
            raise MolarDataError(option, f"must be a whole number, got {value!r}")
        if dest in INTEGER_OPTIONS and isinstance(value, float):
            value = int(value)
            setattr(args, dest, value)
        if not ok(value):
            raise MolarDataError(option, f"{must}, got {value!r}")
    if getattr(args, "num_shards", None) and not getattr(args, "shard_index", 0) < args.num_shards:
        raise MolarDataError("--shard-index", f"must be below --num-shards ({args.num_shards}), got {args.shard_index}")


def check_train_config(config) -> None:
    """The same range checks for a :class:`merlin_molar.training.TrainConfig` given by a library caller."""
    from types import SimpleNamespace

    check_options(SimpleNamespace(epochs=config.epochs, batch_size=config.batch_size, lr=config.learning_rate,
                                  seed=config.seed, save_steps=config.save_steps,
                                  patience=config.early_stopping_patience, eval_every=config.eval_every))


def check_writable_dir(path, option: str) -> Path:
    """``path`` is, or can be created as, a directory this process can write in."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise MolarDataError(option, f"{path} is a file, not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MolarDataError(option, f"{path}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".molar-write-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MolarDataError(option, f"{path}: cannot write in {ancestor} ({e.strerror or e})") from None
    return path


def check_device(device: Optional[str], option: str = "--device") -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and CUDA (device N) present when asked for."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise MolarDataError(option, f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise MolarDataError(option, f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MolarDataError(option, f"{device} asked for, but CUDA is not available here: use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise MolarDataError(option, f"{device}: only {torch.cuda.device_count()} CUDA device(s) here")


def _hub_id_like(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value) is not None and ".." not in value


PACKAGED_ENCODERS = ("minilm", "smollm2", "efficientnet-lite0")  # items.encoders.PACKAGED (kept light)
MODEL_FILE_SUFFIXES = (".gguf", ".pth")  # a decoder LLM in one GGUF file, EfficientNet-Lite0 weights


def check_model_path(value: Optional[str], option: str) -> None:
    """A packaged encoder name, a local model directory (with config.json, modules.json or molar_stage1.json),
    a GGUF / .pth model file, a hub id, or ``TEXT+IMAGE`` (two of those)."""
    if value is None:
        return
    if "+" in str(value) and not Path(os.path.expanduser(str(value))).exists():
        parts = str(value).split("+", 1)
        if not all(parts):
            raise MolarDataError(option, f"{value}: expected TEXT+IMAGE, e.g. minilm+efficientnet-lite0")
        for part in parts:
            check_model_path(part, option)
        return
    if str(value) in PACKAGED_ENCODERS:
        return
    path = Path(os.path.expanduser(str(value)))
    if path.suffix in MODEL_FILE_SUFFIXES:
        if not path.is_file():
            raise MolarDataError(option, f"{value}: file not found")
        return
    if path.exists():
        if not path.is_dir():
            raise MolarDataError(option, f"{value} is a file; expected a model directory (with config.json)")
        if not any((path / f).is_file() for f in MODEL_FILES):
            raise MolarDataError(option, f"{value}: not a model directory (none of {list(MODEL_FILES)})")
        return
    if not _hub_id_like(str(value)):
        raise MolarDataError(option, f"{value}: no such directory")


@contextlib.contextmanager
def loading(option: str, value, failure: str = "cannot load it as a model") -> Iterator[None]:
    """Turn any failure while loading a user-named model (or building one from user options) into a
    one-line error naming the option."""
    try:
        yield
    except MolarDataError:
        raise
    except Exception as e:  # transformers, safetensors, json, OS errors: the named model is unusable
        reason = one_line(str(e).splitlines()[0] if str(e).strip() else type(e).__name__, 300)
        raise MolarDataError(option, f"{value}: {failure} ({type(e).__name__}: {reason})") from None


def check_existing(path, option: str, required_file: Optional[str] = None) -> None:
    if path is None:
        return
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise MolarDataError(option, f"{path}: not found")
    if required_file and not (path / required_file).is_file():
        what = {"molar_manifest.json": "not written by `merlin-molar prepare`",
                "molar_model.json": "not a model saved by `merlin-molar train`",
                "metadata.json": "not an item table written by `merlin-molar embed-items`"}.get(required_file, "")
        raise MolarDataError(option, f"{path}: no {required_file} ({what or 'not the right kind of directory'})")


def _config_class(kind: str):
    from merlin_molar.models.id_models import ID_MODELS
    from merlin_molar.models.molar import MolarConfig

    return {**{name: spec.config for name, spec in ID_MODELS.items()}, "molar": MolarConfig}[kind]


def _check_value(key: str, value, default, option: str) -> None:
    def bad(expected):
        return MolarDataError(option, f"{key} must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < (2 if key == "max_length" else 1):
            raise bad("at least 2" if key == "max_length" else "at least 1")
    elif isinstance(default, float):
        if isinstance(value, bool) or not _finite(value):
            raise bad("a number")
        if value < 0 or (key == "dropout" and value >= 1) or (key == "temperature" and value <= 0):
            raise bad({"dropout": "in [0, 1)", "temperature": "greater than 0"}.get(key, "0 or more"))
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")


PACKAGED_LLMS = ("smollm2",)  # the pretrained decoder LLMs among PACKAGED_ENCODERS


def check_llm_option(value, option: str = "--model-options") -> None:
    """Molar's ``llm``: a config object with ``model_type`` (random init), or a pretrained decoder LLM: a packaged
    name, a GGUF file, a model directory (config.json), or a hub id. Whether a file really is a decoder LLM
    is told when the model is built (a truncated GGUF, another architecture)."""
    wanted = "smollm2, a GGUF file, a decoder model directory or hub id, or a config object with model_type"
    if isinstance(value, dict):
        if not isinstance(value.get("model_type"), str):
            raise MolarDataError(option, f"llm: a config object needs model_type (e.g. \"qwen2\"), got {value!r}")
        return
    if not isinstance(value, str) or not value.strip():
        raise MolarDataError(option, f"llm must be {wanted}, got {value!r}")
    if value in PACKAGED_LLMS:
        return
    if value in PACKAGED_ENCODERS:
        raise MolarDataError(option, f"llm: {value} is an item encoder, not a decoder LLM: use {wanted}")
    path = Path(os.path.expanduser(value))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MolarDataError(option, f"llm: {value}: file not found")
    elif path.exists():
        if not (path / "config.json").is_file():
            raise MolarDataError(option, f"llm: {value}: not a model directory (no config.json)")
    elif not _hub_id_like(value):
        raise MolarDataError(option, f"llm: {value}: no such file or directory")


def check_llm_layers_option(value, option: str = "--model-options") -> None:
    """Molar's ``llm_layers``: null (all layers) or a whole number of at least 1 (the upper bound, the LLM's
    layer count, is checked when the model is built)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MolarDataError(option, f"llm_layers must be null (all layers) or an integer of at least 1, got {value!r}")


def check_lora_option(value, option: str = "--model-options") -> None:
    if value is not None and not isinstance(value, dict):
        raise MolarDataError(option, f"lora must be null or a JSON object of peft LoraConfig options, got {value!r}")


DUEG_OPTIONS = {"llm": check_llm_option, "llm_layers": check_llm_layers_option, "lora": check_lora_option}


def check_model_options(kind: str, options: dict, option: str = "--model-options") -> None:
    """Known keys of the model's config, values of the right type and range."""
    cls = _config_class(kind)
    defaults = cls()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MolarDataError(option, f"unknown key(s) {unknown} for --model {kind}; known: {sorted(known)}")
    from merlin_molar.models.id_models import ID_MODELS

    for key, value in options.items():
        default = getattr(defaults, key)
        if kind == "molar" and key in DUEG_OPTIONS:
            DUEG_OPTIONS[key](value, option)
            continue
        if kind == "molar" and key in ID_MODELS:  # the ID branch's own config
            if not isinstance(value, dict):
                raise MolarDataError(option, f"{key} must be a JSON object, got {value!r}")
            check_model_options(key, value, option)
            continue
        if kind == "molar" and key == "id_model" and value not in ID_MODELS:
            raise MolarDataError(option, f"id_model must be one of {sorted(ID_MODELS)}, got {value!r}")
        _check_value(key, value, default, option)
    if kind == "sasrec":
        d_model, n_heads = options.get("d_model", defaults.d_model), options.get("n_heads", defaults.n_heads)
        if d_model % n_heads:
            raise MolarDataError(option, f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")


def check_model_matches(model_dir, prepared, option: str = "--prepared") -> None:
    """The saved model at ``model_dir`` was trained on ``prepared``'s item id mapping (and max length)."""
    from merlin_molar.items.table import item_id_fingerprint
    from merlin_molar.persistence import read_model_description

    model_dir = Path(model_dir)
    meta = read_model_description(model_dir)
    recorded = meta.get("id_mapping_fingerprint")
    # add-items extends the catalogue: a model trained on an earlier version of it still matches (the old
    # ids keep their codes; new items are scored by content)
    history = prepared.manifest.get("catalogue", {}).get("history", [])
    if recorded is None:
        from merlin.schema import Tags
        from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

        schema_file = model_dir / "schema.json"
        if not schema_file.is_file():
            raise MolarDataError(schema_file, "file not found (not a saved merlin-molar model?)")
        try:
            schema = TensorflowMetadata.from_json(schema_file.read_text()).to_merlin_schema()
            cardinality = int(schema.select_by_tag(Tags.ITEM_ID).first.int_domain.max) + 1
        except Exception as e:
            raise MolarDataError(schema_file, f"not a readable model schema ({one_line(e, 200)})") from None
        if cardinality != prepared.item_cardinality and cardinality not in {v.get("item_cardinality") for v in history}:
            raise MolarDataError(
                option,
                f"{prepared.root} has {prepared.item_cardinality} item ids but the model at {model_dir} scores "
                f"{cardinality}: use the prepared directory the model was trained on",
            )
        import logging

        logging.getLogger(__name__).warning(
            "%s records no item id mapping (saved by an older version): cannot check that it matches %s",
            model_dir, prepared.root,
        )
        return
    versions = {v.get("id_mapping_fingerprint") for v in history}
    if recorded not in versions and recorded != item_id_fingerprint(prepared):
        trained_on = meta.get("prepared") or "another prepared directory"
        raise MolarDataError(
            option,
            f"{prepared.root} maps item ids differently from the data the model at {model_dir} was trained on "
            f"({trained_on}): use that prepared directory",
        )
    model_length = meta.get("prepared_max_length")
    if model_length is not None and int(model_length) != prepared.max_length:
        raise MolarDataError(
            option,
            f"{prepared.root} was prepared with max length {prepared.max_length}, the model at {model_dir} with "
            f"{model_length}: use the prepared directory the model was trained on",
        )


def parse_model_options(value, option: str = "--model-options") -> dict:
    import json

    if not value:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise MolarDataError(option, f"not valid JSON ({e.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise MolarDataError(option, "expected a JSON object")
    return parsed


def check_command(args) -> None:
    """Everything about a parsed command line that can be checked before the command claims or writes
    anything: option ranges, output paths, device, model paths, model options, input directories."""
    command = getattr(args, "command", None)
    check_options(args)
    for dest, option in {**OUTPUTS, **MODEL_PATHS, "data": "--data", "prepared": "--prepared",
                         "model_dir": "--model-dir", "item_table": "--item-table"}.items():
        value = getattr(args, dest, None)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise MolarDataError(option, f"must be a path, got {value!r}")
    for dest, option in OUTPUTS.items():
        if getattr(args, dest, None):
            check_writable_dir(getattr(args, dest), option)
    for dest, option in MODEL_PATHS.items():
        check_model_path(getattr(args, dest, None), option)
    check_device(getattr(args, "device", None))
    prepared = getattr(args, "prepared", None)
    if prepared is not None:
        check_existing(prepared, "--prepared", "molar_manifest.json")
    model_dir = getattr(args, "model_dir", None)
    if model_dir is not None:
        check_existing(model_dir, "--model-dir", "molar_model.json")
    if command == "finetune-items" and args.base_model is not None:
        check_stage1_base_model(str(args.base_model))
    if command == "finetune-items" and (args.base_model is None or
                                        Path(os.path.expanduser(str(args.base_model))).exists()):
        from merlin_molar.items.encoders import detect_kind

        with loading("--base-model", args.base_model or "the default encoder"):
            check_stage1_options(args, detect_kind(args.base_model))
    if command == "embed-items" and not args.output:
        check_writable_dir(Path(os.path.expanduser(str(args.prepared))) / "item_table", "--prepared")
    if command == "train":
        if args.model == "molar" and not args.item_table:
            raise MolarDataError("--item-table", "required for --model molar (run `merlin-molar embed-items` first)")
        check_existing(args.item_table, "--item-table", "metadata.json")
        check_existing(args.init_id_branch, "--init-id-branch", "molar_model.json")
        check_model_options(args.model, parse_model_options(args.model_options))
    if command == "recommend":
        for n, history in enumerate(args.history):
            if not [h for h in str(history).split(",") if h.strip()]:
                raise MolarDataError("--history", f"history {n} is empty: give comma-separated raw item ids")


def check_stage1_base_model(value: str) -> None:
    """Stage 1 fine-tunes a model directory, hub id, decoder LLM GGUF file or the packaged SmolLM2; image encoders
    and joins are refused, and so is a GGUF file transformers cannot load as a decoder LLM."""
    if value == "minilm":
        raise MolarDataError("--base-model", "minilm: leave --base-model out to fine-tune the packaged MiniLM")
    if Path(value).suffix == ".gguf":
        from merlin_molar.items.encoders import check_gguf

        check_gguf(Path(os.path.expanduser(value)))
        return
    if value in PACKAGED_ENCODERS and value != "smollm2" or "+" in value or Path(value).suffix in MODEL_FILE_SUFFIXES:
        raise MolarDataError("--base-model", f"{value}: stage 1 fine-tunes a model directory, hub id, decoder LLM "
                                             "GGUF file or smollm2 (a sentence encoder, text LLM or VLM), not an "
                                             "image encoder or join")


def check_stage1_options(args, kind: str) -> None:
    """``finetune-items`` options that only one kind of base model takes."""
    if kind == "sentence":
        for dest, option in (("checkpoint_every", "--checkpoint-every"), ("resume", "--resume"),
                             ("restart", "--restart")):
            if getattr(args, dest, None) not in (None, False):
                raise MolarDataError(option, "applies to an LLM/VLM base model only; a sentence encoder's stage 1 "
                                             "is short and not checkpointed")
        if args.method == "lora":
            raise MolarDataError("--method", "lora is for LLM/VLM backbones; a sentence encoder is trained fully")
        if args.batch_size is not None and args.batch_size < 2:
            raise MolarDataError("--batch-size", f"must be at least 2 for a sentence encoder (in-batch negatives), "
                                                 f"got {args.batch_size}")
    elif args.temperature is not None:
        raise MolarDataError("--temperature", f"applies to a sentence-encoder base model only; "
                                              f"{args.base_model} is a {kind} model")


def check_checkpoint(checkpoint) -> None:
    """The Trainer checkpoint ``--resume`` would continue from can be read (a run killed while saving can
    leave a damaged one, which would otherwise fail deep inside the Trainer)."""
    import json

    checkpoint = Path(checkpoint)
    remedy = "delete this checkpoint directory to resume from the one before it, or train without --resume"
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MolarDataError(state, f"file not found (an incomplete checkpoint): {remedy}") from None
    except (ValueError, OSError):
        raise MolarDataError(state, f"not valid JSON (a damaged checkpoint): {remedy}") from None
    weights = [checkpoint / n for n in ("pytorch_model.bin", "model.safetensors") if (checkpoint / n).is_file()]
    if not weights:
        raise MolarDataError(checkpoint, f"holds no model weights (an incomplete checkpoint): {remedy}")
    import torch

    for path in weights:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            else:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise MolarDataError(path, f"unreadable checkpoint weights ({type(e).__name__}): {remedy}") from None
