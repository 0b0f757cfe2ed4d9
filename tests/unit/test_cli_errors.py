"""The command line under bad input and damaged files (issue 13): every case below must end with exit code 2,
exactly one stderr line ``merlin-molar <cmd>: error: <file or option>: <problem>`` naming the file or option,
no traceback, no partial output, and the earlier good outputs byte-for-byte unchanged; the cases that used to
leave a manifest behind are then rerun with the corrected arguments into the same output directory.

Everything runs in-process through ``merlin_molar.cli.main`` on the synthetic dataset: one module fixture
prepares it, prepares a second dataset whose item ids are mapped differently, and trains a tiny SASRec."""
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch

from merlin_molar.cli import main
from merlin_molar.data.synthetic import write_synthetic_dataset

SASREC = '{"d_model": 16, "n_layers": 1}'


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_good")
    data = write_synthetic_dataset(root / "data", n_users=120, n_items=60)
    other_data = write_synthetic_dataset(root / "other_data", n_users=120, n_items=60, seed=1)
    collect = _Collect()
    logging.getLogger("merlin_molar").addHandler(collect)
    try:
        assert main(["prepare", "--data", str(data), "--output", str(root / "prepared"), "--max-length", "20"]) == 0
        assert main(["prepare", "--data", str(other_data), "--output", str(root / "other"), "--max-length", "20"]) == 0
        assert main(["train", "--prepared", str(root / "prepared"), "--model", "sasrec", "--model-options", SASREC,
                     "--epochs", "1", "--batch-size", "64", "--save-steps", "0", "--resume",
                     "--output", str(root / "run")]) == 0
    finally:
        logging.getLogger("merlin_molar").removeHandler(collect)
    return SimpleNamespace(root=root, data=data, prepared=root / "prepared", other=root / "other",
                           run=root / "run", model=root / "run" / "model", log=collect.messages)


NEW_ITEM = 90001


@pytest.fixture(scope="module")
def added(good, tmp_path_factory):
    """``good``'s prepared data with an item table and one item added after the SASRec model was trained;
    ``embedded``: the same with its item table, before the item was added (what a Molar model trains on)."""
    prepared = tmp_path_factory.mktemp("cli_added") / "prepared"
    shutil.copytree(good.prepared, prepared)
    assert main(["embed-items", "--prepared", str(prepared), "--device", "cpu"]) == 0
    embedded = prepared.parent / "embedded"
    shutil.copytree(prepared, embedded)
    new = prepared.parent / "new.csv"
    new.write_text(f"item_id,clean_title,year,genres\n{NEW_ITEM},The new film,2024,Drama\n")
    assert main(["add-items", "--prepared", str(prepared), "--items", str(new)]) == 0
    return SimpleNamespace(prepared=prepared, embedded=embedded)


def tree_checksums(*roots) -> dict:
    out = {}
    for root in roots:
        root = Path(root)
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def overwrite(path: Path, offset: int, n: int = 4096) -> None:
    """Overwrite ``n`` bytes at ``offset`` (bounded by the file) with random bytes."""
    data = bytearray(path.read_bytes())
    start = min(offset, max(0, len(data) - n))
    data[start:start + n] = os.urandom(min(n, len(data) - start))
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cut_mid_row(path: Path, rows: int = 4) -> None:
    """Keep the header and ``rows`` rows, then half of the next row's first two fields (a cut-off copy)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: rows + 1]) + lines[rows + 1].split(",")[0] + ",")


def without_checksums(directory: Path) -> None:
    """Make ``directory`` look like one written before checksums were recorded."""
    import json

    manifest = next(directory / n for n in ("molar_model.json", "molar_manifest.json") if (directory / n).exists())
    meta = json.loads(manifest.read_text())
    del meta["sha256"]
    meta.pop("description_sha256", None)  # a model description's checksum of itself came later still
    manifest.write_text(json.dumps(meta))


def _checkpoints(t: Path):
    return sorted((t / "out" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def run_then_damage_last_checkpoint(g, t):
    """A finished run with a checkpoint per step, whose last checkpoint is then truncated."""
    argv = train("--save-steps", "1", "--resume")(g, t)
    assert main(argv) == 0
    truncate(_checkpoints(t)[-1] / "pytorch_model.bin")
    return argv


def drop_last_checkpoint(t: Path) -> list:
    shutil.rmtree(_checkpoints(t)[-1])
    return []


def minilm_path():
    from merlin_molar.items.encoders import default_sentence_model_path

    return default_sentence_model_path()


def copy_of(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def read_only_path(tmp: Path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: use sysfs then)."""
    if os.geteuid() == 0:
        return Path("/sys/molar-read-only-test")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def edit_description(model: Path, edit: Callable[[dict], None], sign: bool = True) -> None:
    """Change a saved model's molar_model.json; ``sign``: with a fresh checksum of its own content, as a
    newer version of merlin-molar would have written it (else: edited by hand, its old checksum kept)."""
    import json

    from merlin_molar.persistence import DESCRIPTION_SHA, _description_digest

    path = model / "molar_model.json"
    meta = json.loads(path.read_text())
    edit(meta)
    if sign:
        meta[DESCRIPTION_SHA] = _description_digest(meta)
    path.write_text(json.dumps(meta))


HELD = []  # open lock files of the "other run" below (kept open for the test's lifetime)


def held_by_another_run(g, t):
    """An output directory whose lock another live run holds (a lock is per open file, so this process can
    play the other run)."""
    import fcntl
    import json

    out = t / "out"
    out.mkdir()
    handle = open(out / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(json.dumps({"pid": 4242, "host": "trainer-7", "command": "train", "since": "2026-12-07 10:00:00"}))
    handle.flush()
    HELD.append(handle)
    return out


def bad_data(tmp: Path, good, edit: Callable[[Path], None]) -> Path:
    data = copy_of(good.data, tmp, "data")
    edit(data)
    return data


@dataclass
class Case:
    name: str
    argv: Callable  # (good, tmp) -> list of arguments; outputs go to tmp / "out"
    names: object  # what the error line must name (the option or the file); or (good, tmp) -> that
    rerun: Optional[Callable] = None  # (good, tmp) -> corrected arguments, same output directory


def P(*args):
    return lambda g, t: [str(a(g, t)) if callable(a) else str(a) for a in args]


OUT = lambda g, t: t / "out"  # noqa: E731
DATA = lambda g, t: g.data  # noqa: E731
PREP = lambda g, t: g.prepared  # noqa: E731
OTHER = lambda g, t: g.other  # noqa: E731
MODEL = lambda g, t: g.model  # noqa: E731


def prepare(data=DATA, *extra):
    return P("prepare", "--data", data, "--output", OUT, "--max-length", "20", *extra)


def train(*extra, prepared=PREP):
    return P("train", "--prepared", prepared, "--model", "sasrec", "--model-options", SASREC, "--epochs", "1",
             "--batch-size", "64", "--save-steps", "0", "--output", OUT, *extra)


def train_molar(llm=None, llm_layers=None):
    """``train --model molar`` on ``added.embedded`` (prepared data and item table) with these DUEG options (``llm``: a
    value or (good, tmp) -> path; None: the default small random LLM)."""
    import json

    def options(g, t):
        chosen = {"llm": str(llm(g, t)) if callable(llm) else llm, "llm_layers": llm_layers}
        options = {"sasrec": {"d_model": 16, "n_layers": 1}, **{k: v for k, v in chosen.items() if v is not None}}
        return json.dumps(options)

    return P("train", "--prepared", lambda g, t: g.added.embedded, "--model", "molar", "--item-table",
             lambda g, t: g.added.embedded / "item_table", "--model-options", options, "--epochs", "1",
             "--batch-size", "64", "--save-steps", "0", "--output", OUT)


def with_file(name: str, content: bytes):
    def make(g, t):
        path = t / name
        path.write_bytes(content)
        return path
    return make


def edited_data(edit):
    return lambda g, t: bad_data(t, g, edit)


def edited_model(edit):
    def make(g, t):
        model = copy_of(g.model, t, "model")
        edit(model)
        return model
    return make


def edited_prepared(edit):
    def make(g, t):
        prepared = copy_of(g.prepared, t, "prepared")
        edit(prepared)
        return prepared
    return make


def a_file(g, t):
    (t / "out").write_text("an earlier file the user keeps\n")
    return t / "out"


def encoder_dir(files: dict):
    def make(g, t):
        d = t / "encoder"
        d.mkdir()
        for name, content in files.items():
            (d / name).write_text(content)
        return d
    return make


def gguf_file(name: str, architecture: str = "llama", keep: float = 1.0):
    """A tiny GGUF file of ``architecture``, cut to the first ``keep`` of its bytes."""
    def make(g, t):
        from merlin_molar.items.testing import save_tiny_gguf

        path = save_tiny_gguf(t / name, architecture)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path
    return make


def other_network_weights(g, t):
    path = t / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    return path


NOT_UTF8 = "user_id,item_id,timestamp\n1,10,100\n2,20,200\n".encode() + b"\xff\xfe\x00\x81bad,\xe9\xe8,3\n"
CASES = [
    # prepare: option ranges, inputs, outputs, config files
    Case("prepare-max-length-0", P("prepare", "--data", DATA, "--output", OUT, "--max-length", "0"), "--max-length",
         rerun=prepare()),
    Case("prepare-max-length-1", P("prepare", "--data", DATA, "--output", OUT, "--max-length", "1"), "--max-length"),
    Case("prepare-max-length-not-a-number", P("prepare", "--data", DATA, "--output", OUT, "--max-length", "ten"),
         "--max-length"),
    Case("prepare-k-core-leaves-no-user", prepare(DATA, "--k-core", "100000"), "--k-core",
         rerun=prepare(DATA, "--k-core", "2")),
    Case("prepare-k-core-negative", prepare(DATA, "--k-core", "-3"), "--k-core"),
    Case("prepare-missing-data", prepare(lambda g, t: t / "nowhere"), "nowhere"),
    Case("prepare-data-is-a-file", prepare(with_file("data.csv", b"user_id,item_id\n")), "data.csv"),
    Case("prepare-unknown-format", prepare(DATA, "--format", "excel"), "excel"),
    Case("prepare-missing-output-option", P("prepare", "--data", DATA), "--output"),
    Case("prepare-output-is-a-file", P("prepare", "--data", DATA, "--output", a_file), "--output"),
    Case("prepare-output-read-only", P("prepare", "--data", DATA, "--output", lambda g, t: read_only_path(t) / "o"),
         "--output"),
    Case("prepare-non-utf8-csv", prepare(edited_data(lambda d: (d / "interactions.csv").write_bytes(NOT_UTF8))),
         "interactions.csv"),
    Case("prepare-binary-items-csv",
         prepare(edited_data(lambda d: (d / "items.csv").write_bytes(os.urandom(3000)))), "items.csv"),
    Case("prepare-truncated-csv", prepare(edited_data(lambda d: cut_mid_row(d / "interactions.csv"))),
         "interactions.csv"),
    Case("prepare-missing-timestamp-column",
         prepare(edited_data(lambda d: (d / "interactions.csv").write_text("user_id,item_id\n1,10\n"))),
         "interactions.csv"),
    Case("prepare-a-non-integer-id-among-integers",
         prepare(edited_data(lambda d: (d / "interactions.csv").write_text(
             (d / "interactions.csv").read_text().replace("\n", "\n7,1.5,100\n", 1)))),
         lambda g, t: f"{t / 'data' / 'interactions.csv'}: item_id: 1 non-integer value(s) among integer ids, e.g. "
                      "[1.5] (line(s) [2])", rerun=prepare()),
    Case("prepare-timestamps-neither-numbers-nor-dates",
         prepare(edited_data(lambda d: (d / "interactions.csv").write_text(
             "user_id,item_id,timestamp\n1,10,2024-03-01T10:00:00Z\n1,20,yesterday\n1,30,2024-03-02\n"))),
         "timestamp: 1 value(s) neither a number nor an ISO 8601 date, e.g. ['yesterday']", rerun=prepare()),
    Case("prepare-item-ids-do-not-match",  # fails after the workflow ran: the rollback must remove everything
         prepare(edited_data(lambda d: (d / "items.csv").write_text("item_id,title\n99999,Nothing\n"))),
         lambda g, t: f"{t / 'data'}: no interacted item appears in the item table", rerun=prepare()),
    Case("prepare-bad-yaml", P("prepare", "--config", with_file("bad.yaml", b"data: [unclosed\nmax_length: 3\n")),
         "bad.yaml"),
    Case("prepare-bad-toml", P("prepare", "--config", with_file("bad.toml", b"max_length = = 3\n")), "bad.toml"),
    Case("prepare-binary-config", P("prepare", "--config", with_file("cfg.yaml", b"\xff\xfe\x00\x01\x02")),
         "cfg.yaml"),
    Case("prepare-config-unknown-key", P("prepare", "--config", with_file("cfg.toml", b"max_lenght = 20\n")),
         "cfg.toml"),
    Case("prepare-config-max-length-0",
         lambda g, t: ["prepare", "--config", str(with_file("cfg.yaml", f"data: {g.data}\noutput: {t / 'out'}\n"
                                                             "max_length: 0\n".encode())(g, t))],
         "--max-length", rerun=prepare()),
    # train: ranges, model options, inputs, outputs, damaged prepared data
    Case("train-epochs-negative", train("--epochs", "-1"), "--epochs", rerun=train()),
    Case("train-epochs-0", train("--epochs", "0"), "--epochs"),
    Case("train-patience-negative", train("--patience", "-1"), "--patience"),
    Case("train-batch-size-0", train("--batch-size", "0"), "--batch-size", rerun=train()),
    Case("train-lr-0", train("--lr", "0"), "--lr"),
    Case("train-save-steps-negative", train("--save-steps", "-5"), "--save-steps"),
    Case("train-unknown-model-option", train("--model-options", '{"d_modle": 16}'), "--model-options"),
    Case("train-model-options-not-json", train("--model-options", "{d_model: 16"), "--model-options"),
    Case("train-model-option-wrong-type", train("--model-options", '{"d_model": "big"}'), "--model-options"),
    Case("train-model-option-heads-do-not-divide", train("--model-options", '{"d_model": 15, "n_heads": 2}'),
         "--model-options"),
    Case("train-model-option-out-of-range", train("--model-options", '{"dropout": 1.5}'), "--model-options"),
    Case("train-model-option-max-length-1", train("--model-options", '{"max_length": 1}'), "--model-options"),
    Case("train-config-unknown-model", P("train", "--prepared", PREP, "--output", OUT, "--config",
                                         with_file("cfg.yaml", b"model: transformer-xl\n")), "cfg.yaml"),
    Case("train-config-output-not-a-path", lambda g, t: train()(g, t)[:-2] + ["--config", str(with_file(
        "cfg.yaml", b"output: 5\n")(g, t))], "--output"),
    Case("train-molar-without-item-table", train("--model", "molar"), "--item-table"),
    # train: Molar's DUEG from a pretrained LLM (--model-options llm / llm_layers)
    Case("train-molar-llm-truncated-gguf", train_molar(llm=gguf_file("cut.gguf", keep=0.6)),
         "cut.gguf: truncated or damaged GGUF file", rerun=train_molar()),
    Case("train-molar-llm-gguf-of-another-architecture", train_molar(llm=gguf_file("clip.gguf", "clip")),
         "clip.gguf: architecture 'clip'"),
    Case("train-molar-llm-missing-gguf", train_molar(llm=lambda g, t: t / "none.gguf"), "none.gguf: file not found"),
    Case("train-molar-llm-an-item-encoder", train_molar(llm="minilm"),
         "--model-options: llm: minilm is an item encoder, not a decoder LLM"),
    Case("train-molar-llm-layers-0", train_molar(llm_layers=0), "--model-options: llm_layers must be null"),
    Case("train-molar-llm-layers-beyond-the-llm", train_molar(llm_layers=3),
         "llm_layers must be between 1 and 2 (the LLM's layers), got 3"),
    Case("train-missing-item-table", train("--model", "molar", "--item-table", lambda g, t: t / "none"),
         "--item-table"),
    Case("train-missing-prepared", train(prepared=lambda g, t: t / "none"), "--prepared"),
    Case("train-output-is-a-file", P("train", "--prepared", PREP, "--model", "sasrec", "--output", a_file), "--output"),
    Case("train-into-another-runs-directory", P("train", "--prepared", PREP, "--model", "sasrec", "--model-options",
                                                '{"d_model": 32, "n_layers": 1}', "--epochs", "1", "--save-steps",
                                                "0", "--output", lambda g, t: g.run), lambda g, t: f"{g.run}:"),
    Case("train-corrupt-prepared-parquet",
         train(prepared=edited_prepared(lambda p: overwrite(p / "train" / "part_0.parquet", 100, 400))),
         "part_0.parquet"),
    Case("train-truncated-prepared-parquet",
         train(prepared=edited_prepared(lambda p: truncate(p / "valid" / "part_0.parquet"))), "part_0.parquet"),
    Case("train-truncated-parquet-of-a-prepared-dir-without-checksums",
         train(prepared=edited_prepared(lambda p: (without_checksums(p), truncate(p / "test" / "part_0.parquet")))),
         "part_0.parquet"),
    Case("train-output-read-only", lambda g, t: train()(g, t)[:-1] + [str(read_only_path(t) / "r")], "--output"),
    Case("train-resume-from-a-damaged-checkpoint", run_then_damage_last_checkpoint, "pytorch_model.bin",
         rerun=lambda g, t: drop_last_checkpoint(t) + train("--save-steps", "1", "--resume")(g, t)),
    Case("train-output-held-by-another-run", lambda g, t: train()(g, t)[:-1] + [str(held_by_another_run(g, t))],
         lambda g, t: f"{t / 'out'}: in use by another run (`merlin-molar train`, pid 4242 on trainer-7"),
    Case("train-damaged-prepared-manifest",
         train(prepared=edited_prepared(lambda p: (p / "molar_manifest.json").write_bytes(os.urandom(64)))),
         "molar_manifest.json"),
    # embed-items / finetune-items: encoders, devices, outputs
    Case("embed-missing-encoder", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                    lambda g, t: t / "no-such-model"), "--encoder"),
    Case("embed-encoder-not-a-model", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                        encoder_dir({"notes.txt": "hello"})), "--encoder"),
    Case("embed-encoder-bad-config", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                       encoder_dir({"config.json": '{"model_type": "no-such-arch"}'})), "--encoder"),
    Case("embed-device-unknown", P("embed-items", "--prepared", PREP, "--output", OUT, "--device", "gpu0"),
         "--device"),
    Case("embed-device-cuda-index-out-of-range",
         P("embed-items", "--prepared", PREP, "--output", OUT, "--device", "cuda:99"), "--device"),
    Case("embed-batch-size-0", P("embed-items", "--prepared", PREP, "--output", OUT, "--batch-size", "0"),
         "--batch-size"),
    Case("embed-shard-index-out-of-range",
         P("embed-items", "--prepared", PREP, "--output", OUT, "--num-shards", "2", "--shard-index", "2"),
         "--shard-index"),
    Case("embed-output-is-a-file", P("embed-items", "--prepared", PREP, "--output", a_file), "--output"),
    Case("embed-unknown-kind", P("embed-items", "--prepared", PREP, "--output", OUT, "--kind", "audio"), "--kind"),
    Case("embed-fusion-without-an-image-encoder",
         P("embed-items", "--prepared", PREP, "--output", OUT, "--fusion", "l2"), "--fusion: joins the parts"),
    Case("embed-truncated-gguf", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                   gguf_file("cut.gguf", keep=0.6)), "cut.gguf: truncated or damaged GGUF file"),
    Case("embed-gguf-of-another-architecture", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                                 gguf_file("clip.gguf", "clip")), "clip.gguf: architecture 'clip'"),
    Case("embed-gguf-that-is-not-gguf", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                          with_file("model.gguf", b"\x00" * 64)), "model.gguf: not a GGUF file"),
    Case("embed-missing-gguf", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                 lambda g, t: t / "none.gguf"), "none.gguf: file not found"),
    Case("embed-weights-of-another-network", P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder",
                                               other_network_weights), "resnet.pth: not EfficientNet-Lite0 weights"),
    Case("embed-text-and-image-without-the-image",
         P("embed-items", "--prepared", PREP, "--output", OUT, "--encoder", "minilm+"),
         "--encoder: minilm+: expected TEXT+IMAGE"),
    Case("finetune-missing-base-model", P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model",
                                          lambda g, t: t / "no-such-llm"), "--base-model"),
    Case("finetune-base-model-is-a-file", P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model",
                                            with_file("model.bin", b"\x00" * 64)), "--base-model"),
    Case("finetune-base-model-bad-config", P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model",
                                             encoder_dir({"config.json": "{not json"})), "--base-model"),
    Case("finetune-image-encoder", P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model",
                                     "efficientnet-lite0"), "--base-model: efficientnet-lite0: stage 1 fine-tunes"),
    Case("finetune-truncated-gguf", P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model",
                                      gguf_file("cut.gguf", keep=0.6)), "cut.gguf: truncated or damaged GGUF file"),
    Case("finetune-gguf-of-another-architecture", P("finetune-items", "--prepared", PREP, "--output", OUT,
                                                    "--base-model", gguf_file("clip.gguf", "clip")),
         "clip.gguf: architecture 'clip'"),
    Case("finetune-checkpoint-every-negative", P("finetune-items", "--prepared", PREP, "--output", OUT,
                                                 "--base-model", gguf_file("llama.gguf"), "--checkpoint-every", "-1"),
         "--checkpoint-every"),
    Case("finetune-sentence-encoder-resume", P("finetune-items", "--prepared", PREP, "--output", OUT, "--resume"),
         "--resume: applies to an LLM/VLM base model only"),
    Case("finetune-sentence-encoder-with-lora",
         P("finetune-items", "--prepared", PREP, "--output", OUT, "--base-model", lambda g, t: minilm_path(),
           "--method", "lora"), "--method"),
    Case("finetune-temperature-0", P("finetune-items", "--prepared", PREP, "--output", OUT, "--temperature", "0"),
         "--temperature"),
    # evaluate / recommend / export: damaged models, mismatched prepared data, ranges
    Case("evaluate-other-prepared", P("evaluate", "--model-dir", MODEL, "--prepared", OTHER), "--prepared"),
    Case("evaluate-corrupt-weights",
         P("evaluate", "--model-dir", edited_model(lambda m: overwrite(m / "weights.pt", 2048)), "--prepared", PREP),
         "weights.pt"),
    Case("evaluate-truncated-weights",
         P("evaluate", "--model-dir", edited_model(lambda m: truncate(m / "weights.pt")), "--prepared", PREP),
         "weights.pt"),
    Case("evaluate-truncated-weights-of-a-model-saved-without-checksums",
         P("evaluate", "--model-dir", edited_model(lambda m: (without_checksums(m), truncate(m / "weights.pt"))),
           "--prepared", PREP), "weights.pt"),
    Case("evaluate-missing-weights",
         P("evaluate", "--model-dir", edited_model(lambda m: (m / "weights.pt").unlink()), "--prepared", PREP),
         "weights.pt"),
    Case("evaluate-damaged-schema",
         P("evaluate", "--model-dir", edited_model(lambda m: overwrite(m / "schema.json", 10, 20)), "--prepared", PREP),
         "schema.json"),
    Case("evaluate-damaged-model-description",
         P("evaluate", "--model-dir", edited_model(lambda m: (m / "molar_model.json").write_bytes(os.urandom(80))),
           "--prepared", PREP), "molar_model.json"),
    Case("evaluate-missing-model-dir", P("evaluate", "--model-dir", lambda g, t: t / "none", "--prepared", PREP),
         "--model-dir"),
    Case("evaluate-model-description-edited-by-hand",
         P("evaluate", "--model-dir", edited_model(lambda m: edit_description(
             m, lambda d: d.update(kind="gru4rec"), sign=False)), "--prepared", PREP),
         "molar_model.json: checksum mismatch"),
    Case("evaluate-model-of-a-newer-format",
         P("evaluate", "--model-dir", edited_model(lambda m: edit_description(m, lambda d: d.update(format=2))),
           "--prepared", PREP), "molar_model.json: saved in model format 2"),
    Case("recommend-model-of-a-newer-version",
         P("recommend", "--model-dir", edited_model(lambda m: edit_description(
             m, lambda d: d.update(merlin_molar="9.0.0"))), "--prepared", PREP, "--history", "10"),
         "molar_model.json: saved by merlin-molar 9.0.0"),
    Case("evaluate-model-config-unknown-key",
         P("evaluate", "--model-dir", edited_model(lambda m: edit_description(
             m, lambda d: d["config"].update(d_modle=16))), "--prepared", PREP),
         "molar_model.json: config: unknown key(s) ['d_modle']"),
    Case("evaluate-model-config-unknown-key-saved-without-checksums",
         P("evaluate", "--model-dir", edited_model(lambda m: (without_checksums(m), edit_description(
             m, lambda d: d["config"].update(d_modle=16), sign=False))),
           "--prepared", PREP), "molar_model.json: config: unknown key(s) ['d_modle']"),
    Case("evaluate-unknown-split", P("evaluate", "--model-dir", MODEL, "--prepared", PREP, "--split", "train"),
         "--split"),
    Case("recommend-other-prepared", P("recommend", "--model-dir", MODEL, "--prepared", OTHER, "--history", "10,20"),
         "--prepared"),
    Case("recommend-top-k-0", P("recommend", "--model-dir", MODEL, "--prepared", PREP, "--history", "10", "--top-k",
                                "0"), "--top-k"),
    Case("recommend-top-k-too-large", P("recommend", "--model-dir", MODEL, "--prepared", PREP, "--history", "10",
                                        "--top-k", "100000"), "--top-k"),
    Case("recommend-empty-history", P("recommend", "--model-dir", MODEL, "--prepared", PREP, "--history", " , "),
         "--history"),
    Case("recommend-sasrec-history-with-an-item-added-after-training",
         P("recommend", "--model-dir", MODEL, "--prepared", lambda g, t: g.added.prepared, "--history",
           f"10,{NEW_ITEM}"), f"--history: history 0: item id(s) ['{NEW_ITEM}'] were added after the SASRec model"),
    Case("recommend-unknown-raw-id", P("recommend", "--model-dir", MODEL, "--prepared", PREP, "--history", "10,999999"),
         "--history: history 0: unknown item id(s) ['999999']"),
    Case("export-other-prepared", P("export", "--model-dir", MODEL, "--prepared", OTHER, "--repository", OUT),
         "--prepared"),
    Case("export-top-k-0", P("export", "--model-dir", MODEL, "--prepared", PREP, "--repository", OUT, "--top-k", "0"),
         "--top-k"),
    Case("export-repository-read-only", P("export", "--model-dir", MODEL, "--prepared", PREP, "--repository",
                                          lambda g, t: read_only_path(t) / "repo"), "--repository"),
    Case("recommend-missing-weights", P("recommend", "--model-dir", edited_model(lambda m: (m / "weights.pt").unlink()),
                                        "--prepared", PREP, "--history", "10"), "weights.pt"),
    Case("export-top-k-too-large", P("export", "--model-dir", MODEL, "--prepared", PREP, "--repository", OUT,
                                     "--top-k", "100000"), "top_k"),
    Case("export-into-a-non-empty-repository",
         P("export", "--model-dir", MODEL, "--prepared", PREP, "--repository",
           lambda g, t: (t / "out").mkdir() or (t / "out" / "notes.txt").write_text("keep") and t / "out"),
         lambda g, t: f"--repository: {t / 'out'} already exists and is not empty: choose another directory, or "
                      "replace it with --overwrite"),
    Case("export-repository-is-a-file", P("export", "--model-dir", MODEL, "--prepared", PREP, "--repository", a_file),
         "--repository"),
    Case("quickstart-epochs-0", P("quickstart", "--data", DATA, "--workdir", OUT, "--epochs", "0"), "--epochs"),
    Case("extend-model-temperature-0", P("extend-model", "--model-dir", MODEL, "--prepared", PREP, "--output", OUT,
                                         "--new-item-temperature", "0"), "--new-item-temperature"),
    Case("extend-model-temperature-not-a-number", P("extend-model", "--model-dir", MODEL, "--prepared", PREP,
                                                    "--output", OUT, "--new-item-temperature", "warm"),
         "--new-item-temperature"),
]


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, good, added, tmp_path, capsys):
    good.added = added
    if case.name == "embed-device-cuda-index-out-of-range" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    argv = case.argv(good, tmp_path)
    out = tmp_path / "out"
    before_out = tree_checksums(out) if out.exists() else None
    before = tree_checksums(good.data, good.prepared, good.other, good.run)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits
        code = e.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    command = argv[0]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"merlin-molar {command}: error: "), err
    names = case.names(good, tmp_path) if callable(case.names) else case.names
    assert names in lines[0], err
    assert "Traceback" not in err
    if before_out is None:
        assert not out.exists(), f"partial output left: {sorted(out.rglob('*'))}"
    else:
        assert tree_checksums(out) == before_out
    assert tree_checksums(good.data, good.prepared, good.other, good.run) == before
    if case.rerun is not None:
        assert main(case.rerun(good, tmp_path)) == 0, capsys.readouterr().err
        assert (out / "molar_manifest.json").is_file()


def test_cuda_without_cuda_is_a_one_line_error(good, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["embed-items", "--prepared", str(good.prepared), "--output", str(tmp_path / "t"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device: cuda asked for, but CUDA is not available" in err
    assert not (tmp_path / "t").exists()


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(good):
    assert any("--resume: no checkpoint" in m and "starting from scratch" in m for m in good.log)


def test_evaluate_writes_nothing_into_the_model_directory(good, capsys):
    before = tree_checksums(good.model)
    mode = good.model.stat().st_mode
    good.model.chmod(0o555)  # read-only (for root, only the checksums below can show a write)
    try:
        assert main(["evaluate", "--model-dir", str(good.model), "--prepared", str(good.prepared)]) == 0
    finally:
        good.model.chmod(mode)
    assert '"ndcg@10"' in capsys.readouterr().out
    assert tree_checksums(good.model) == before


def test_recommend_on_the_right_prepared_directory_works(good, capsys):
    assert main(["recommend", "--model-dir", str(good.model), "--prepared", str(good.prepared), "--history", "10,20",
                 "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header + 3


def test_verbose_prints_the_traceback(good, tmp_path, capsys):
    model = copy_of(good.model, tmp_path, "model")
    overwrite(model / "weights.pt", 2048)
    assert main(["-v", "evaluate", "--model-dir", str(model), "--prepared", str(good.prepared)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("merlin-molar evaluate: error: ")
    assert "weights.pt: checksum mismatch" in err


# Reruns after a failure, an interruption or a kill (issue 31): what a user would expect happens.
def test_export_overwrite_replaces_a_non_empty_repository(good, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("old")
    argv = ["export", "--model-dir", str(good.model), "--prepared", str(good.prepared), "--repository", str(repo)]
    assert main(argv) == 2
    assert main(argv + ["--overwrite"]) == 0, capsys.readouterr().err
    assert (repo / "molar_serving.json").is_file() and not (repo / "notes.txt").exists()


def test_a_plain_rerun_of_an_interrupted_train_continues_and_restart_starts_over(good, tmp_path, capsys, caplog):
    import json

    run = tmp_path / "out"
    argv = train("--save-steps", "1")(good, tmp_path)
    assert main(argv) == 0
    last = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    shutil.rmtree(run / "model")  # as if interrupted after its last checkpoint
    (run / "metrics.json").unlink()
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["resumed_from"] == str(last)
    assert f"continuing from {last.name} (--restart starts over)" in caplog.text
    assert main(argv + ["--restart"]) == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from"] is None
    with pytest.raises(SystemExit) as exited:  # one or the other
        main(argv + ["--restart", "--resume"])
    assert exited.value.code == 2
    assert not (run / ".lock").exists()  # the lock goes with the run


def test_an_interrupted_train_says_how_to_continue(good, tmp_path, capsys, monkeypatch):
    import merlin_molar.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", interrupted)
    assert main(train()(good, tmp_path)) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("merlin-molar train: error: interrupted: run the same command again to continue from the last "
                   "checkpoint (--restart starts over)")


def test_a_rerun_removes_what_a_killed_run_left(good, tmp_path, capsys):
    """SIGKILL leaves a ``.tmp-*`` directory (and the lock file) behind; the next run into the directory removes
    the dead run's scratch, and leaves a live run's alone."""
    import subprocess

    from merlin_molar.io import owner_tag

    out = tmp_path / "out"
    assert main(prepare()(good, tmp_path)) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".tmp-train-{owner_tag(dead.pid)}-k1ll3d"
    (stale / "sub").mkdir(parents=True)
    (out / ".lock").write_text('{"pid": %d}' % dead.pid)  # its flock went with it
    live = out / f".tmp-valid-{owner_tag()}-alive00"
    live.mkdir()
    assert main(prepare()(good, tmp_path)) == 0, capsys.readouterr().err
    assert not stale.exists() and live.exists()
    assert not (out / ".lock").exists()


# Input that works, with what a user would want to know said once (issue 31).
def with_short_users(d: Path) -> None:
    with open(d / "interactions.csv", "a") as f:
        f.write("9001,10,1\n9002,20,1\n9002,30,2\n")


def test_users_with_too_few_interactions_are_counted_not_silently_dropped(good, tmp_path, capsys, caplog):
    data = bad_data(tmp_path, good, with_short_users)
    assert main(["prepare", "--data", str(data), "--output", str(tmp_path / "out"), "--max-length", "20"]) == 0
    full = tmp_path / "full"
    assert main(["prepare", "--data", str(good.data), "--output", str(full), "--max-length", "20"]) == 0
    out = capsys.readouterr().out
    import json

    m, f = (json.loads((p / "molar_manifest.json").read_text()) for p in (tmp_path / "out", full))
    assert m["interactions"] == f["interactions"] and m["users"] == f["users"]  # their rows are not counted
    assert m["users_left_out"] == {"fewer_than": 3, "users": 2, "interactions": 3}
    assert "(2 user(s) with fewer than 3 interactions left out, 3 rows)" in out
    assert "2 user(s) with fewer than 3 interactions (3 rows) left out" in caplog.text


def test_add_items_says_which_columns_it_ignores_and_takes_fewer_quietly(good, added, tmp_path, capsys, caplog):
    prepared = tmp_path / "prepared"
    shutil.copytree(added.prepared, prepared)
    extra = tmp_path / "extra.csv"
    extra.write_text("item_id,clean_title,year,genres,description\n90002,A film,2025,Drama,About things\n")
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("item_id,clean_title\n90003,Another film\n")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pandas FutureWarning (or any other) reaches the user
        assert main(["add-items", "--prepared", str(prepared), "--items", str(extra)]) == 0
        assert main(["add-items", "--prepared", str(prepared), "--items", str(fewer)]) == 0
    assert "column(s) ['description'] ignored" in caplog.text
    assert "Warning" not in capsys.readouterr().err
    import pandas as pd

    items = pd.read_parquet(prepared / "items.parquet")
    assert items["year"].dtype == pd.read_parquet(good.prepared / "items.parquet")["year"].dtype
    assert items.set_index("item_id_raw").loc[90003, "year"] is pd.NA


def test_sasrec_recommends_old_items_after_add_items_and_evaluates(good, added, capsys):
    argv = ["--model-dir", str(good.model), "--prepared", str(added.prepared)]
    assert main(["recommend", *argv, "--history", "10,20", "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert str(NEW_ITEM) not in printed and len(printed.strip().splitlines()) == 6
    assert main(["evaluate", *argv]) == 0
