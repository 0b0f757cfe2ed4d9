"""Scale-out on real ml-100k: NVTabular on a 2-worker Dask cluster, SASRec under ``torchrun`` (gloo, CPU).

The training comparison controls what DDP cannot change by itself: dropout off, the same seed, and the same
sequences in every optimizer step. The train rows are read in file order (no shuffle): one process reads 128
interleaved rows per step, process ``r`` of two reads 64 rows of file ``r`` — the same 128 rows. Every
sequence is cut to 10 items (all ml-100k users have at least 18 training items), so each process holds the
same number of next-item targets and the mean of the two per-process losses is the loss of the 128 rows.
What remains is float summation order (all-reduce of two half-batch gradients vs one full-batch sum):
weights agree to about 3e-6 after 21 Adam steps, so the tolerances below are 1e-4 on weights, 1e-4
relative on gradient norms (losses are logged rounded to 1e-4), and two users (2/943) on each ranking
metric (a metric moves only if a score perturbation of that size swaps a target with its neighbour at a
cut-off). Evaluation of the same weights
is asserted bit-identical.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dask
import pandas as pd
import pytest
import torch
from distributed import get_task_stream

from merlin_molar.data import SPLITS, load_prepared, prepare, read_dataset
from merlin_molar.distributed import (
    configure_workers,
    dask_cluster,
    data_parallel_config,
    gathered_evaluation_loop,
    per_device_batch_size,
)
from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.io import file_checksums, read_json, write_json
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.training import TrainConfig, make_trainer

WORKER = Path(__file__).with_name("ddp_worker.py")
LAUNCH_TIMEOUT = 300  # a DDP hang fails the test instead of blocking the suite
STEPS_PER_EPOCH = 7  # 896 rows / global batch 128
RANKING = ("ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50")


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _check(proc_outputs):
    for code, output in proc_outputs:
        assert code == 0, output[-6000:]


def _spec(root: Path, name: str, prepared: Path, jobs) -> str:
    path = root / f"{name}.spec.json"
    path.write_text(json.dumps({"prepared": str(prepared), "out": str(root), "jobs": jobs}))
    return str(path)


def single(spec):
    cmd = [sys.executable, str(WORKER), spec]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    _check([(out.returncode, out.stdout + out.stderr)])


def torchrun(spec, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(WORKER), spec]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    _check([(out.returncode, out.stdout + out.stderr)])


def two_nodes(spec):
    """Two one-process "nodes": both processes have LOCAL_RANK 0, global ranks 0 and 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), spec],
            env=_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(r),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    _check([(p.wait(timeout=LAUNCH_TIMEOUT), p.stdout.read()) for p in procs])


def _ordered_train_dirs(prepared, root: Path):
    """The same 896 rows, 10 items each: one file in step order for 1 process, one file per rank for 2."""
    train = prepared.split_frame("train").iloc[:896].reset_index(drop=True)
    train[ITEM_SEQUENCE] = train[ITEM_SEQUENCE].map(lambda s: list(s[-10:]))
    assert train[ITEM_SEQUENCE].map(len).eq(10).all()
    halves = [train.iloc[:448], train.iloc[448:]]
    one, two = root / "ordered1", root / "ordered2"
    one.mkdir()
    two.mkdir()
    for rank, half in enumerate(halves):
        half.to_parquet(two / f"part_{rank}.parquet", index=False)
    steps = [half.iloc[64 * k : 64 * (k + 1)] for k in range(STEPS_PER_EPOCH) for half in halves]
    pd.concat(steps).to_parquet(one / "part_0.parquet", index=False)
    return one, two


def _uneven_copy(prepared, root: Path) -> Path:
    """A copy of ``prepared`` whose train split has two partitions of 600 and 343 rows."""
    copy = root / "uneven"
    shutil.copytree(prepared.root, copy)
    train = prepared.split_frame("train")
    schema = (copy / "train" / "schema.pbtxt").read_bytes()
    shutil.rmtree(copy / "train")
    (copy / "train").mkdir()
    (copy / "train" / "schema.pbtxt").write_bytes(schema)
    train.iloc[:600].to_parquet(copy / "train" / "part_0.parquet", index=False)
    train.iloc[600:].to_parquet(copy / "train" / "part_1.parquet", index=False)
    manifest = read_json(copy / "molar_manifest.json")  # the re-partitioned split is the new, intended content
    manifest["sha256"] = {k: v for k, v in manifest["sha256"].items() if not k.startswith("train/")}
    manifest["sha256"].update(file_checksums(copy, ["train"]))
    write_json(copy / "molar_manifest.json", manifest)
    return copy


@pytest.fixture(scope="module")
def runs(ml100k_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one, two = _ordered_train_dirs(ml100k_prepared, root)
    uneven = _uneven_copy(ml100k_prepared, root)

    def train(name, directory, **kw):
        return {"kind": "train", "name": name, "train_dir": str(directory), "global_batch": 128, "epochs": 3,
                "learning_rate": 3e-3, "save_steps": 2 * STEPS_PER_EPOCH, **kw}

    def evaluation(name, weights):
        return {"kind": "eval", "name": name, "weights": str(root / f"{weights}.pt")}

    prepared = ml100k_prepared.root
    single(_spec(root, "one", prepared, [train("one", one), evaluation("eval_one", "one")]))
    torchrun(_spec(root, "two", prepared, [
        train("two", two),
        train("two_from_one", two, resume=str(root / "one" / "checkpoint-14")),
        evaluation("eval_two", "one"),
        {"kind": "uneven", "name": "uneven", "prepared": str(uneven)},
    ]))
    single(_spec(root, "one_more", prepared, [
        train("one_from_two", one, resume=str(root / "two" / "checkpoint-14")),
        evaluation("eval_one_of_two", "two"),
    ]))
    two_nodes(_spec(root, "nodes", prepared, [evaluation("eval_nodes", "one")]))
    results = {p.stem: json.loads(p.read_text()) for p in root.glob("*.json") if not p.name.endswith(".spec.json")}
    return root, results


def _without_key_bias(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The attention's key bias (the middle third of ``in_proj_bias``) shifts every score of a query by the same
    amount, which the softmax cancels: its gradient is zero up to float noise, which Adam's normalised steps
    turn into ~1e-4 moves (6e-4 apart after 21 steps here) that change no output. Left out of the comparison."""
    if not name.endswith("self_attn.in_proj_bias"):
        return weight
    width = weight.numel() // 3
    return torch.cat([weight[:width], weight[2 * width:]])


def _max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    return max((_without_key_bias(k, wa[k]) - _without_key_bias(k, wb[k])).abs().max().item() for k in wa)


def _close_steps(a, b, steps=None):
    """Same logged steps; the Trainer logs losses rounded to 4 decimals, gradient norms unrounded."""
    steps = steps or a["losses"].keys()
    assert set(steps) <= a["losses"].keys() and set(steps) <= b["losses"].keys()
    for step in steps:
        assert a["losses"][step] == pytest.approx(b["losses"][step], abs=1.01e-4), step
        assert a["grad_norms"][step] == pytest.approx(b["grad_norms"][step], rel=1e-4), step


def test_torchrun_two_processes_train_like_one(runs, ml100k_prepared):
    root, r = runs
    one, two = r["one"], r["two"]
    assert (one["world_size"], one["per_device_batch"]) == (1, 128)
    assert (two["world_size"], two["per_device_batch"]) == (2, 64)
    assert one["global_step"] == two["global_step"] == 3 * STEPS_PER_EPOCH
    assert one["losses"].keys() == two["losses"].keys()
    _close_steps(one, two)
    assert _max_weight_difference(root / "one.pt", root / "two.pt") < 1e-4

    users = ml100k_prepared.manifest["users"]
    learned, ddp_learned = r["eval_one"], r["eval_one_of_two"]
    for split in ("valid", "test"):
        for metric in RANKING:
            assert abs(learned[split][metric] - ddp_learned[split][metric]) <= 2 / users + 1e-9, (split, metric)
        assert learned[split]["loss"] == pytest.approx(ddp_learned[split]["loss"], rel=1e-4)
    assert learned["valid"]["recall@50"] > 0.08  # it learned something (untrained: ~0.03)


def test_resume_from_a_checkpoint_of_another_process_count(runs):
    root, r = runs
    # a checkpoint of each: one rng_state.pth from 1 process, one rng_state_<rank>.pth per process from 2
    assert (root / "one" / "checkpoint-14" / "rng_state.pth").exists()
    rng_states = {p.name for p in (root / "two" / "checkpoint-14").glob("rng_state*")}
    assert rng_states == {"rng_state_0.pth", "rng_state_1.pth"}
    for name, reference in (("two_from_one", "one"), ("one_from_two", "two")):
        assert r[name]["global_step"] == 3 * STEPS_PER_EPOCH
        assert r[name]["steps_run"] == STEPS_PER_EPOCH  # only the third epoch ran
        _close_steps(r[name], r[reference], steps=[str(s) for s in range(15, 22)])
        assert _max_weight_difference(root / f"{name}.pt", root / f"{reference}.pt") < 1e-4


def test_two_process_evaluation_equals_one_process_exactly(runs, ml100k_prepared):
    _, r = runs
    reference = r["eval_one"]
    assert reference["world_size"] == 1
    users = ml100k_prepared.manifest["users"]
    # torchrun on one node; two "nodes" of one process each (global rank != local rank)
    for name in ("eval_two", "eval_nodes"):
        got = r[name]
        assert got["world_size"] == 2
        for split in ("valid", "test"):
            assert {m: got[split][m] for m in RANKING} == {m: reference[split][m] for m in RANKING}, (name, split)
            # batch boundaries differ, so the row-weighted mean of batch losses differs in float rounding only
            assert got[split]["loss"] == pytest.approx(reference[split]["loss"], rel=1e-6)
        for loader in ("train_rows_per_rank", "valid_rows_per_rank"):
            shards = [set(map(tuple, rows)) for rows in got[loader]]
            assert all(len(s) > 400 for s in shards), (name, loader)
            assert not shards[0] & shards[1], (name, loader)
            assert shards[0] | shards[1] == set(map(tuple, reference[loader][0])), (name, loader)
            assert sum(map(len, got[loader])) == users
        # evaluation rows: rank 0 then rank 1 is the file order, which the gathered metric rows rely on
        assert [tuple(x) for rows in got["valid_rows_per_rank"] for x in rows] == [
            tuple(x) for x in reference["valid_rows_per_rank"][0]
        ]


def test_unequal_training_shards_are_refused_instead_of_hanging(runs):
    _, r = runs
    assert "[10, 6] training batches" in r["uneven"]["refused"]


def test_gathered_loop_equals_transformers4rec_loop_in_one_process(runs, ml100k_prepared, tmp_path):
    root, _ = runs
    torch.manual_seed(0)
    model = sasrec_model(ml100k_prepared.schema, SASRecConfig(max_length=20, d_model=32, dropout=0.0))
    model.load_state_dict(torch.load(root / "one.pt", weights_only=True))
    trainer = make_trainer(model, ml100k_prepared, tmp_path, TrainConfig(eval_batch_size=100))
    trainer.earlier_items = {}  # upstream's loop knows no earlier-items table: both mask the window alone
    loader = trainer.get_eval_dataloader()
    ours = gathered_evaluation_loop(trainer, loader, "valid")
    upstream = type(trainer).__mro__[2].evaluation_loop(trainer, loader, "valid", metric_key_prefix="valid")
    ranking = {k: v for k, v in upstream.metrics.items() if "_at_" in k}
    assert ranking and {k: ours.metrics[k] for k in ranking} == ranking
    assert ours.num_samples == ml100k_prepared.manifest["users"]
    assert ours.predictions is None  # no [users x items] score matrix kept


def test_torchrun_on_cpu_without_use_cpu_is_refused(ml100k_prepared, tmp_path, monkeypatch):
    # what torchrun's environment looks like to a process whose Trainer did not join the process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = sasrec_model(ml100k_prepared.schema, SASRecConfig(max_length=20, d_model=16, n_layers=1))
    with pytest.raises(RuntimeError, match="torchrun started 2 processes but the Trainer runs as 1"):
        make_trainer(model, ml100k_prepared, tmp_path, TrainConfig(extra={"use_cpu": False}))


def test_global_batch_is_split_over_processes():
    assert per_device_batch_size(128, world_size=2) == 64
    assert per_device_batch_size(128, world_size=8, gradient_accumulation_steps=2) == 8
    with pytest.raises(ValueError, match="not divisible"):
        per_device_batch_size(100, world_size=8)
    config = data_parallel_config(TrainConfig(batch_size=128), world_size=4, ddp_find_unused_parameters=False)
    assert config.batch_size == 32 and config.extra == {"ddp_find_unused_parameters": False}
    config = data_parallel_config(TrainConfig(), global_batch_size=256, world_size=2, gradient_accumulation_steps=2)
    assert config.batch_size == 64


def test_two_dask_workers_write_the_single_process_output(ml100k_prepared, ml100k_dir, tmp_path):
    raw = read_dataset(ml100k_dir)
    with dask_cluster(n_workers=2) as cluster:
        client = cluster.client
        # a worker started elsewhere (`dask worker`) does not inherit the client's dask config
        client.run(lambda: dask.config.set({"dataframe.convert-string": True}))
        configure_workers(client)
        assert set(client.run(lambda: dask.config.get("dataframe.convert-string")).values()) == {False}
        with get_task_stream(client) as tasks:
            out = prepare(raw, tmp_path / "dask", max_length=ml100k_prepared.max_length, partitions=4)
        assert len({t["worker"] for t in tasks.data}) == 2
    for split in SPLITS:
        pd.testing.assert_frame_equal(out.split_frame(split), ml100k_prepared.split_frame(split))
    pd.testing.assert_frame_equal(out.items(), ml100k_prepared.items())
    # the same data; file checksums differ where file layout does (4 partitions, paths in the schema files)
    assert {k: v for k, v in out.manifest.items() if k != "sha256"} == {
        k: v for k, v in ml100k_prepared.manifest.items() if k != "sha256"}
    ours, reference = load_prepared(out.root).schema[ITEM_SEQUENCE], ml100k_prepared.schema[ITEM_SEQUENCE]
    vocabularies = [pd.read_parquet(c.properties["cat_path"]) for c in (ours, reference)]
    pd.testing.assert_frame_equal(*vocabularies)
    same_but_path = {**ours.properties, "cat_path": reference.properties["cat_path"]}
    assert ours.with_properties(same_but_path) == reference


def test_equal_timestamps_keep_the_raw_table_order(ml100k_prepared, ml100k_dir):
    raw = read_dataset(ml100k_dir).interactions
    ties = raw.duplicated(["user_id", "timestamp"], keep=False)
    assert ties.sum() > 10_000  # ml-100k rates many movies in the same second: the order of ties matters
    expected = raw.sort_values("timestamp", kind="stable").groupby("user_id")["item_id"].apply(list)
    items = ml100k_prepared.items()
    decode = dict(zip(items["item_id"], items["item_id_raw"]))
    test = ml100k_prepared.split_frame("test").set_index("user_id")
    max_length = ml100k_prepared.max_length
    for user, seq in test[ITEM_SEQUENCE].items():
        assert [decode[int(i)] for i in seq] == expected[user][-max_length:], user
