"""Latency and throughput of an exported Molar model on a real Triton server, next to in-process latency.

Builds (or takes) a Molar model on ml-100k, exports it with :func:`merlin_molar.serving.export_triton`,
starts the ``tritonserver`` bundled in nvidia-pytriton on 127.0.0.1 and runs a bounded closed loop: each of
``--clients`` threads sends ``--requests`` requests back to back (own tritonclient connection, HTTP or gRPC)
with real ml-100k histories in raw ids, batch 1 and batch 64. Each configuration also stops after
``--max-seconds``. In the same run the same saved model is timed in this process on the same histories:

* ``in-process model``: encoded histories -> window -> Transformers4Rec model -> history mask -> top-k;
* ``in-process graph``: the exported merlin-systems graph run by ``Ensemble.transform`` (raw ids ->
  request checks -> Categorify mapping -> lean model -> top-k), no Triton.

The ratio column is served p50 / in-process model p50 at the same batch. ``executor_ms`` is Triton's own
per-request time inside the executor model, from the server's statistics API (``workflow_ms`` only for
repositories exported before the workflow moved into the executor's step; see serving_load.py for the
load benchmark). Results: benchmarks/results/serving_latency/
serving_latency.json. The model weights are random (``--train-epochs 0``): latency does not depend on them.

    nice -n 10 .venv/bin/python benchmarks/serving_latency.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides before T4Rec is imported)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import command_line, git_commit, machine, now, table, result_path, write_result  # noqa: E402
from merlin_molar.ids import ITEM_SEQUENCE  # noqa: E402
from merlin_molar.data import load_prepared, prepare, read_dataset  # noqa: E402
from merlin_molar.models.molar import MolarConfig, molar_model  # noqa: E402
from merlin_molar.pipeline import model_provenance  # noqa: E402
from merlin_molar.persistence import load_model, save_model  # noqa: E402
from merlin_molar.serving import TritonServer, build_ensemble, export_triton  # noqa: E402
from merlin_molar.serving.client import connect, history_tensors, recommend  # noqa: E402
from merlin_molar.serving.lean import right_padded_window  # noqa: E402
from merlin_molar.training import TrainConfig, make_trainer  # noqa: E402
from merlin_molar.models.dueg import small_decoder_config  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def percentiles(latencies_s):
    ms = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def build_model(args, work: Path):
    prepared_dir = work / "prepared"
    if (prepared_dir / "molar_manifest.json").exists():
        prepared = load_prepared(prepared_dir)
    else:
        prepared = prepare(read_dataset(args.data), prepared_dir, max_length=args.max_length)
    torch.manual_seed(0)
    config = MolarConfig(
        llm=small_decoder_config("qwen2", hidden_size=args.hidden, num_layers=args.layers).to_dict(),
        sasrec=dict(d_model=args.hidden, n_layers=args.layers, n_heads=2, dropout=0.1, max_length=args.max_length),
        max_length=args.max_length,
    )
    table_ = torch.randn(prepared.item_cardinality, args.content_dim)
    model = molar_model(prepared.schema, table_, config)
    if args.train_epochs:
        make_trainer(model, prepared, work / "run", TrainConfig(epochs=args.train_epochs, batch_size=128)).train()
    return save_model(model, work / "model", "molar", config, prepared.schema, table_,
                      model_provenance(prepared)), prepared


def request_batches(prepared, batch: int, count: int):
    """``count`` batches of real test-split histories in raw ids, cycling through the users."""
    test = pd.read_parquet(prepared.split_path("test") / "part_0.parquet", columns=[ITEM_SEQUENCE])
    items = pd.read_parquet(prepared.items_path, columns=["item_id", "item_id_raw"])
    raw = np.zeros(prepared.item_cardinality, dtype=np.int64)
    raw[items["item_id"].to_numpy()] = items["item_id_raw"].to_numpy()
    histories = [raw[np.asarray(s)].tolist() for s in test[ITEM_SEQUENCE]]
    return [[histories[(i * batch + j) % len(histories)] for j in range(batch)] for i in range(count)]


def time_in_process(model_dir, prepared, batches, max_length, top_k, seconds):
    model, *_ = load_model(model_dir)
    items = pd.read_parquet(prepared.items_path, columns=["item_id", "item_id_raw"])
    encode = dict(zip(items["item_id_raw"], items["item_id"]))
    encoded = [[np.array([encode[i] for i in h]) for h in b] for b in batches]
    latencies, deadline = [], None
    with torch.no_grad():
        for n, batch in enumerate([encoded[0]] * 5 + encoded):
            if n == 5:
                latencies, deadline = [], time.monotonic() + seconds
            start = time.perf_counter()
            values = np.concatenate(batch)
            offsets = np.concatenate([[0], np.cumsum([len(h) for h in batch])])
            scores = model({ITEM_SEQUENCE: torch.from_numpy(right_padded_window(values, offsets, max_length))})
            rows = torch.from_numpy(np.repeat(np.arange(len(batch)), np.diff(offsets)))
            scores[rows, torch.from_numpy(values)] = float("-inf")
            torch.topk(scores, top_k, dim=-1)
            latencies.append(time.perf_counter() - start)
            if deadline and time.monotonic() > deadline and len(latencies) >= 3:
                break
    return latencies


def _table(batch):
    from merlin.table import TensorTable

    values, offsets = history_tensors(batch)
    return TensorTable({f"{ITEM_SEQUENCE}__values": values, f"{ITEM_SEQUENCE}__offsets": offsets})


def time_graph(model_dir, prepared, batches, top_k, seconds):
    ensemble = build_ensemble(model_dir, prepared.root, top_k=top_k, max_batch_size=max(len(b) for b in batches))
    ensemble.transform(_table(batches[0]))  # loads the model
    latencies, deadline = [], None
    for n, batch in enumerate([batches[0]] * 5 + batches):
        if n == 5:
            latencies, deadline = [], time.monotonic() + seconds
        start = time.perf_counter()
        ensemble.transform(_table(batch))
        latencies.append(time.perf_counter() - start)
        if deadline and time.monotonic() > deadline and len(latencies) >= 3:
            break
    return latencies


def closed_loop(url, protocol, batches, clients, requests, seconds):
    """``clients`` threads, each sending up to ``requests`` requests back to back; bounded by ``seconds``."""
    latencies, errors = [[] for _ in range(clients)], []
    deadline = time.monotonic() + seconds
    barrier = threading.Barrier(clients + 1)

    def worker(idx):
        client = connect(url, protocol)
        recommend(client, batches[idx % len(batches)])  # warm the connection
        barrier.wait()
        for n in range(requests):
            batch = batches[(idx * requests + n) % len(batches)]
            start = time.perf_counter()
            try:
                recommend(client, batch)
            except Exception as exc:  # noqa: BLE001  (counted and reported, the loop goes on)
                errors.append(repr(exc)[:200])
            latencies[idx].append(time.perf_counter() - start)
            if time.monotonic() > deadline and len(latencies[idx]) >= 3:
                break
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = [x for lat in latencies for x in lat]
    return flat, wall, errors


def server_stats(client):
    """Cumulative per-model Triton statistics: request count and total ns in queue / compute / overall."""
    out = {}
    for model in client.get_inference_statistics()["model_stats"]:
        stats = model["inference_stats"]
        out[model["name"]] = {k: (int(stats[k]["count"]), int(stats[k]["ns"])) for k in
                              ("success", "queue", "compute_infer")}
    return out


def stats_delta(before, after):
    """Mean milliseconds per request inside each model during one configuration."""
    delta = {}
    for name, now_ in after.items():
        prev = before.get(name, {})
        row = {}
        for key, (count, ns) in now_.items():
            c0, n0 = prev.get(key, (0, 0))
            row[f"{key}_ms"] = (ns - n0) / max(count - c0, 1) / 1e6
        delta[name] = row
    return delta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--max-length", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--content-dim", type=int, default=384)
    parser.add_argument("--train-epochs", type=float, default=0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads, in the server's model process and in-process alike")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--protocols", nargs="+", default=["http", "grpc"])
    parser.add_argument("--requests", type=int, default=200, help="requests per client at batch 1 (fewer for larger)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per configuration")
    parser.add_argument("--output", default=str(result_path("serving_latency", "serving_latency.json")))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    started = now()
    info = machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="molar-serving-bench-"))
    model_dir, prepared = build_model(args, work)
    repository = export_triton(model_dir, prepared.root, work / "repository", top_k=args.top_k,
                               max_batch_size=max(args.batches), overwrite=True, torch_threads=args.torch_threads)

    rows, in_process = [], {}
    with TritonServer(repository) as server:
        urls = {"http": server.http_url, "grpc": server.grpc_url}
        stats_client = connect(server.http_url, "http")
        for batch in args.batches:
            # in-process first, next to the served runs of the same batch: the machine's load drifts
            batches = request_batches(prepared, batch, max(40, args.requests // batch))
            model_lat = time_in_process(model_dir, prepared, batches, args.max_length, args.top_k, args.max_seconds)
            graph_lat = time_graph(model_dir, prepared, batches, args.top_k, args.max_seconds)
            in_process[batch] = percentiles(model_lat)
            for name, lat in (("in-process model", model_lat), ("in-process graph", graph_lat)):
                rows.append({"path": name, "protocol": "-", "batch": batch, "clients": 1, "requests": len(lat),
                             **percentiles(lat), "req_per_s": len(lat) / sum(lat), "errors": 0})
            requests = max(40, args.requests // max(1, batch // 8))
            batches = request_batches(prepared, batch, 64)
            for protocol in args.protocols:
                for clients in args.clients:
                    before = server_stats(stats_client)
                    lat, wall, errors = closed_loop(urls[protocol], protocol, batches, clients, requests,
                                                    args.max_seconds)
                    inside = stats_delta(before, server_stats(stats_client))
                    rows.append({"path": "triton", "protocol": protocol, "batch": batch, "clients": clients,
                                 "requests": len(lat), **percentiles(lat), "req_per_s": len(lat) / wall,
                                 "errors": len(errors), "first_error": errors[0] if errors else None,
                                 "executor_ms": inside["molar"]["success_ms"],
                                 "workflow_ms": inside.get("0_transformworkflowtriton", {}).get("success_ms"),
                                 "per_model": inside})
    for row in rows:
        row["items_per_s"] = row["req_per_s"] * row["batch"]
        row["served_over_in_process_p50"] = row["p50_ms"] / in_process[row["batch"]]["p50_ms"]

    columns = ["path", "protocol", "batch", "clients", "requests", "p50_ms", "p95_ms", "p99_ms", "req_per_s",
               "items_per_s", "served_over_in_process_p50", "executor_ms", "workflow_ms", "errors"]
    print(table(rows, columns))
    out = write_result(args.output, {
        "benchmark": "serving_latency",
        "command": command_line(),
        "date": started,
        "started": started,
        "finished": now(),
        "git_commit": git_commit(),
        "machine": {**info, "note": "server, clients and in-process timing share the same CPUs (loopback), "
                                    "and other jobs ran on them too: see the load averages"},
        "model": {"kind": "molar", "llm": f"qwen2 random init, hidden {args.hidden}, {args.layers} layers",
                  "sasrec": f"d_model {args.hidden}, {args.layers} layers", "content_dim": args.content_dim,
                  "max_length": args.max_length, "items": prepared.item_cardinality,
                  "trained_epochs": args.train_epochs, "top_k": args.top_k,
                  "torch_threads": args.torch_threads},
        "server": "tritonserver 2.51 bundled in nvidia-pytriton 0.7.0, Python backend, CPU, 127.0.0.1; "
                  "one executor model (Categorify mapping + lean model), one instance",
        "load": {"closed_loop": True, "requests_per_client": args.requests, "max_seconds": args.max_seconds},
        "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
