"""Load benchmark of an exported Molar model on the real Triton server, on loopback (127.0.0.1) only.

Builds a quickstart-size Molar (random-init 2-layer width-64 Qwen2 DUEG + 2-layer width-64 SASRec ID branch,
window 50, 384-d content table; ``--train-epochs 0``: latency does not depend on the weights) on ml-100k, or on
ml-100k with its item ids turned into product codes (``--string-ids``), exports it with ``--instances``
Triton instances (default: one per core) and 1 torch thread each, and starts the ``tritonserver`` bundled in
nvidia-pytriton. Then:

1. **Batch-1 latency**, one client, requests back to back, in interleaved blocks so that the machine's
   drifting load hits every path alike: the served model over gRPC and HTTP; in this process the same step
   the server runs (:meth:`MolarRecommend.recommend`: raw ids -> Categorify mapping -> lean model -> top-k ->
   raw ids, 1 torch thread); and, for reference, the Transformers4Rec forward of the saved model. The same
   in-process step is also timed once before the server starts.
2. **Load**, closed loop, for each ``--clients`` count: ``--requests`` planned requests shared by that many
   client processes (each its own tritonclient connection), with mixed batch sizes (``--batch-mix``) and
   ``--bad-fraction`` bad requests mixed in (unknown ids, empty history, oversized batch, malformed or
   decreasing offsets, wrong dtype). Every answer is checked (shape, sorted finite scores, no history item,
   ids from the catalogue), every ``--sample-every``-th good request against the in-process answer computed
   beforehand (ids equal, scores within 1e-5), and every bad request must get INVALID_ARG with its message.
   Each level is bounded by ``--max-seconds`` and each request by ``--timeout`` seconds.

Outcomes per request: ok, expected_error (a bad request refused with its clear message), unexpected_error,
mismatch (a wrong answer), lost (no answer: timeout or broken connection). The result JSON (default
benchmarks/results/serving_load/serving_load.json) has a top-level ``summary`` with the acceptance numbers, the exact
command, the machine and its load averages (server, clients and in-process timing share the same cores).

    .venv/bin/python benchmarks/serving_load.py                       # 10,000 requests per client count
    .venv/bin/python benchmarks/serving_load.py --requests 600 --latency-requests 200   # a quick check
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import result_path  # noqa: E402  (stdlib only, cheap for the client processes)
SHARED = HERE.parents[1] / "shared" / "data" / "ml-100k"
# (kind, expected message) of the bad requests mixed into the load
BAD_KINDS = {
    "unknown_id": "unknown item id",
    "empty_history": "empty history",
    "oversized_batch": "exceeds the maximum batch size",
    "decreasing_offsets": "increasing order",
    "offsets_not_from_0": "must start at 0",
    "wrong_dtype": "expects",
}


def pcts(latencies_s) -> dict:
    ms = np.asarray(latencies_s, dtype=float) * 1000
    if not len(ms):
        return {}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p99.9_ms": float(np.percentile(ms, 99.9)), "mean_ms": float(ms.mean()), "n": int(len(ms))}


def build(args, work: Path):
    """Prepared data, a saved quickstart-size Molar, and its exported repository."""
    import torch

    from merlin_molar.data import load_prepared, prepare, read_dataset
    from merlin_molar.data.synthetic import product_code
    from merlin_molar.models.molar import MolarConfig, molar_model
    from merlin_molar.pipeline import model_provenance
    from merlin_molar.persistence import save_model
    from merlin_molar.quickstart import MAX_LENGTH
    from merlin_molar.serving import export_triton
    from merlin_molar.training import TrainConfig, make_trainer

    prepared_dir = work / ("prepared-coded" if args.string_ids else "prepared")
    if (prepared_dir / "molar_manifest.json").exists():
        prepared = load_prepared(prepared_dir)
    else:
        raw = read_dataset(args.data)
        if args.string_ids:  # a catalogue keyed by product codes, as most real ones are
            raw.interactions["item_id"] = raw.interactions["item_id"].map(product_code)
            raw.items["item_id"] = raw.items["item_id"].map(product_code)
        prepared = prepare(raw, prepared_dir, max_length=MAX_LENGTH)
    torch.manual_seed(0)
    config = MolarConfig(max_length=MAX_LENGTH, sasrec={"max_length": MAX_LENGTH})  # the quickstart size: defaults
    table = torch.randn(prepared.item_cardinality, args.content_dim)
    model = molar_model(prepared.schema, table, config)
    if args.train_epochs:
        make_trainer(model, prepared, work / "run", TrainConfig(epochs=args.train_epochs, batch_size=128)).train()
    model_dir = save_model(model, work / "model", "molar", config, prepared.schema, table, model_provenance(prepared))
    repository = export_triton(model_dir, prepared.root, work / "repository", top_k=args.top_k,
                               max_batch_size=args.max_batch_size, overwrite=True, torch_threads=1,
                               instances=args.instances, pin_cores=args.pin_cores)
    return prepared, model_dir, repository, config


def real_histories(prepared, rng):
    """Every test-split history in raw ids, each cut to a random length 1..its own (at most the window)."""
    import pandas as pd

    from merlin_molar.ids import ITEM_SEQUENCE

    test = pd.read_parquet(prepared.split_path("test") / "part_0.parquet", columns=[ITEM_SEQUENCE])
    items = pd.read_parquet(prepared.items_path, columns=["item_id", "item_id_raw"])
    raw = np.empty(prepared.item_cardinality, dtype=object)
    raw[items["item_id"].to_numpy()] = items["item_id_raw"].to_numpy()
    out = []
    for seq in test[ITEM_SEQUENCE]:
        seq = np.asarray(seq)
        out.append(raw[seq[-int(rng.integers(1, len(seq) + 1)):]].tolist())
    return out, items["item_id_raw"].to_numpy()


def bad_request(kind, histories, rng, max_batch_size, strings):
    from merlin_molar.serving.client import history_tensors

    good = [histories[int(i)] for i in rng.integers(len(histories), size=2)]
    values, offsets = history_tensors(good)
    if kind == "unknown_id":
        return history_tensors([good[0], good[1] + (["ZZZ" + str(rng.integers(1e6))] if strings
                                                    else [10**9 + int(rng.integers(1e6))])])
    if kind == "empty_history":
        return history_tensors([good[0], []])
    if kind == "oversized_batch":
        return history_tensors([good[0][:1]] * (max_batch_size + 1))
    if kind == "decreasing_offsets":
        return values, np.array([0, len(values), 1, len(values)], np.int32)
    if kind == "offsets_not_from_0":
        return values, np.array([1, len(values)], np.int32)
    if kind == "wrong_dtype":
        return (np.arange(len(values), dtype=np.int64) if strings else values.astype(np.float32)), offsets
    raise ValueError(kind)


def make_plan(n, histories, rng, batch_mix, bad_fraction, max_batch_size, strings):
    """``n`` requests: ``(kind, values, offsets, None)``; bad kinds in turn, batch sizes drawn from the mix."""
    from merlin_molar.serving.client import history_tensors

    sizes, weights = zip(*batch_mix)
    weights = np.asarray(weights, float) / sum(weights)
    plan, kinds = [], list(BAD_KINDS)
    for i in range(n):
        if rng.random() < bad_fraction:
            kind = kinds[i % len(kinds)]
            values, offsets = bad_request(kind, histories, rng, max_batch_size, strings)
            plan.append((kind, values, offsets, BAD_KINDS[kind]))
        else:
            batch = int(rng.choice(sizes, p=weights))
            values, offsets = history_tensors([histories[int(j)] for j in rng.integers(len(histories), size=batch)])
            plan.append(("good", values, offsets, None))
    return plan


def with_expectations(plan, op, every):
    """Every ``every``-th good request carries the in-process answer it must equal (string ids as the UTF-8
    bytes that both the step and Triton's BYTES tensors hold)."""
    out, good = [], 0
    for kind, values, offsets, expect in plan:
        if kind == "good":
            if good % every == 0:
                expect = op.recommend(values, offsets.astype(np.int64))
            good += 1
        out.append((kind, values, offsets, expect))
    return out


def triton_stats(client) -> dict:
    out = {}
    for model in client.get_inference_statistics()["model_stats"]:
        stats = model["inference_stats"]
        out[model["name"]] = {k: (int(stats[k]["count"]), int(stats[k]["ns"]))
                              for k in ("success", "fail", "queue", "compute_infer")}
    return out


def stats_delta(before, after) -> dict:
    delta = {}
    for name, now in after.items():
        prev = before.get(name, {})
        row = {}
        for key, (count, ns) in now.items():
            c0, n0 = prev.get(key, (0, 0))
            row[f"{key}_count"] = count - c0
            if key != "fail":
                row[f"{key}_ms"] = (ns - n0) / max(count - c0, 1) / 1e6
        delta[name] = row
    return delta


def latency_phase(args, server, op, t4rec, histories, stats_client, phase):
    """Batch 1, one client, back to back; in-process / gRPC / HTTP / T4Rec in interleaved blocks."""
    from merlin_molar.serving.client import connect, history_tensors, infer_inputs

    clients = {p: connect(server.grpc_url if p == "grpc" else server.http_url, p) for p in ("grpc", "http")}
    rng = np.random.default_rng(1)
    requests = [history_tensors([histories[int(i)]]) for i in rng.integers(len(histories), size=args.latency_requests)]
    paths = {
        "in-process (served step)": lambda v, o: op.recommend(v, o.astype(np.int64)),
        "served grpc": lambda v, o: clients["grpc"].infer("molar", infer_inputs(clients["grpc"], v, o)),
        "served http": lambda v, o: clients["http"].infer("molar", infer_inputs(clients["http"], v, o)),
        "in-process T4Rec forward": t4rec,
    }
    for fn in paths.values():  # warm up every path
        for values, offsets in requests[:20]:
            fn(values, offsets)
    latencies = {name: [] for name in paths}
    block = max(1, args.latency_requests // args.latency_blocks)
    before, phase["load_average_before"] = triton_stats(stats_client), list(os.getloadavg())
    deadline = time.monotonic() + args.max_seconds
    for start in range(0, len(requests), block):
        for name, fn in paths.items():
            for values, offsets in requests[start:start + block]:
                t0 = time.perf_counter()
                fn(values, offsets)
                latencies[name].append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    phase["triton"] = stats_delta(before, triton_stats(stats_client))
    phase["load_average_after"] = list(os.getloadavg())
    for client in clients.values():
        client.close()
    return {name: pcts(lat) for name, lat in latencies.items()}


def load_level(args, server, plan, clients, catalogue_ids, top_k):
    from load_client import run_client

    shares = [plan[i::clients] for i in range(clients)]
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + args.client_startup
    with context.Pool(clients) as pool:
        jobs = [pool.apply_async(run_client, (server.grpc_url if args.protocol == "grpc" else server.http_url,
                                              args.protocol, share, top_k, catalogue_ids, start_at, args.timeout,
                                              args.max_seconds)) for share in shares]
        results = [job.get(timeout=args.max_seconds + args.client_startup + 120) for job in jobs]
    # from the common start to the last answer (a late-starting client would only lower the throughput)
    wall = max(res["ended"] for res in results) - min(res["began"] for res in results)
    late_start_s = max(res["began"] for res in results) - start_at
    records = [rec for res in results for rec in res["records"]]
    notes = {}
    for res in results:
        for outcome, messages in res["notes"].items():
            notes.setdefault(outcome, []).extend(messages)
    planned = sum(res["planned"] for res in results)
    counts = {o: sum(1 for r in records if r[3] == o) for o in ("ok", "expected_error", "unexpected_error",
                                                                "mismatch", "lost")}
    counts["not_sent"] = planned - len(records)  # only if --max-seconds stopped the level early
    by_kind = {}
    for _, _, kind, outcome in records:
        by_kind.setdefault(kind, {}).setdefault(outcome, 0)
        by_kind[kind][outcome] += 1
    good = [r for r in records if r[2] == "good"]
    return {
        "clients": clients,
        "requests": len(records),
        "wall_s": wall,
        "latest_client_start_after_s": late_start_s,
        "req_per_s": len(records) / wall,
        "histories_per_s": sum(r[1] for r in records if r[2] == "good") / wall,
        "good_batch1": pcts([r[0] for r in good if r[1] == 1]),
        "good_all": pcts([r[0] for r in good]),
        "outcomes": counts,
        "by_kind": by_kind,
        "sampled_against_in_process": sum(1 for p in plan if p[0] == "good" and p[3] is not None),
        "notes": {k: v[:5] for k, v in notes.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--string-ids", action="store_true", help="ml-100k with product codes as item ids")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--content-dim", type=int, default=384)
    parser.add_argument("--train-epochs", type=float, default=0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--instances", type=int, default=os.cpu_count(), help="Triton instances (one per core)")
    parser.add_argument("--pin-cores", action="store_true", help="export --pin-cores: instance i on core i")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="of the load phase")
    parser.add_argument("--latency-requests", type=int, default=1000, help="batch-1 requests per path")
    parser.add_argument("--latency-blocks", type=int, default=10)
    parser.add_argument("--requests", type=int, default=10_000, help="planned requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-mix", default="1:60,2:10,8:15,32:10,64:5", help="batch:weight,...")
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--sample-every", type=int, default=20, help="check every N-th good answer in-process")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="cap per phase / client count")
    parser.add_argument("--client-startup", type=float, default=8.0, help="seconds for client processes to start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(result_path("serving_load", "serving_load.json")))
    args = parser.parse_args(argv)
    batch_mix = [tuple(int(x) for x in part.split(":")) for part in args.batch_mix.split(",")]
    if max(b for b, _ in batch_mix) > args.max_batch_size:
        parser.error("--batch-mix: a batch size exceeds --max-batch-size")

    import merlin_molar  # noqa: F401  (compat overrides before T4Rec is imported)
    import torch
    from common import command_line, git_commit, machine, now, table, write_result
    from merlin.systems.dag import Ensemble

    from merlin_molar.ids import ITEM_SEQUENCE
    from merlin_molar.persistence import load_model
    from merlin_molar.serving import TritonServer
    from merlin_molar.serving.client import connect, history_tensors
    from merlin_molar.serving.lean import right_padded_window

    torch.set_num_threads(1)
    started, info = now(), machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="molar-serving-load-"))
    prepared, model_dir, repository, config = build(args, work)
    rng = np.random.default_rng(args.seed)
    histories, catalogue_ids = real_histories(prepared, rng)
    if not args.string_ids:
        catalogue_ids = catalogue_ids.astype(np.int64)
    else:
        catalogue_ids = np.array([c.encode() for c in catalogue_ids], dtype=object)

    # the served step, in this process: the same artifacts the server loads
    ensemble_dir = repository / "molar" / "1" / "ensemble"
    op = Ensemble.load(str(ensemble_dir)).graph.output_node.op
    op.load_artifacts(str(ensemble_dir))
    model, *_ = load_model(model_dir)

    def t4rec(values, offsets):  # today's path: Transformers4Rec forward on the encoded window, top-k
        encoded = op._codec.encode(values, offsets)
        window = torch.from_numpy(right_padded_window(encoded, offsets.astype(np.int64), config.max_length))
        with torch.no_grad():
            scores = model({ITEM_SEQUENCE: window})
            scores[0, torch.from_numpy(encoded)] = float("-inf")
            return torch.topk(scores, args.top_k, dim=-1)

    plan = make_plan(args.requests, histories, rng, batch_mix, args.bad_fraction, args.max_batch_size,
                     args.string_ids)
    plan = with_expectations(plan, op, args.sample_every)

    # the same batch-1 step in-process before the server and its instances exist, for comparison with the
    # interleaved measurement below (which shares the cores with the idle server)
    picks = np.random.default_rng(1).integers(len(histories), size=args.latency_requests)
    alone = [history_tensors([histories[int(i)]]) for i in picks]
    for values, offsets in alone[:20]:
        op.recommend(values, offsets.astype(np.int64))
    alone_latencies = []
    for values, offsets in alone:
        t0 = time.perf_counter()
        op.recommend(values, offsets.astype(np.int64))
        alone_latencies.append(time.perf_counter() - t0)
    alone_load = list(os.getloadavg())

    load_rows, phases = [], {}
    with TritonServer(repository) as server:
        stats_client = connect(server.http_url, "http")
        phases["latency"] = {"note": "Triton's statistics over the timed batch-1 requests (gRPC and HTTP)"}
        latency = latency_phase(args, server, op, t4rec, histories, stats_client, phases["latency"])
        latency["in-process (served step), no server running"] = pcts(alone_latencies)
        phases["latency"]["load_average_during_no_server_run"] = alone_load
        for clients in args.clients:
            before, load_before = triton_stats(stats_client), list(os.getloadavg())
            row = load_level(args, server, plan, clients, catalogue_ids, args.top_k)
            row["triton"] = stats_delta(before, triton_stats(stats_client))
            row["load_average_before"], row["load_average_after"] = load_before, list(os.getloadavg())
            load_rows.append(row)
            print(f"  {clients} client(s): {row['requests']} requests, {row['req_per_s']:.1f} req/s, "
                  f"{row['outcomes']}", flush=True)
        server_log_tail = server.log()[-2000:]

    inproc, grpc = latency["in-process (served step)"], latency["served grpc"]
    by_clients = {row["clients"]: row for row in load_rows}
    totals = {k: sum(row["outcomes"][k] for row in load_rows) for k in load_rows[0]["outcomes"]}
    summary = {
        "batch1_grpc_p50_ms": grpc["p50_ms"],
        "batch1_grpc_p99_ms": grpc["p99_ms"],
        "batch1_http_p99_ms": latency["served http"]["p99_ms"],
        "batch1_inprocess_p50_ms": inproc["p50_ms"],
        "batch1_inprocess_p99_ms": inproc["p99_ms"],
        "batch1_inprocess_no_server_p50_ms": latency["in-process (served step), no server running"]["p50_ms"],
        "batch1_t4rec_inprocess_p50_ms": latency["in-process T4Rec forward"]["p50_ms"],
        "batch1_served_minus_inprocess_p50_ms": grpc["p50_ms"] - inproc["p50_ms"],
        "throughput_4clients_over_1client": (by_clients[4]["req_per_s"] / by_clients[1]["req_per_s"]
                                             if 1 in by_clients and 4 in by_clients else None),
        "unexpected_errors": totals["unexpected_error"],
        "mismatched_responses": totals["mismatch"],
        "lost_responses": totals["lost"],
        "expected_errors": totals["expected_error"],
        "not_sent": totals["not_sent"],
        "requests_sent": sum(row["requests"] for row in load_rows),
        "sampled_against_in_process_per_level": load_rows[0]["sampled_against_in_process"],
        "instances": args.instances,
        "torch_threads_per_instance": 1,
        "pin_cores": args.pin_cores,
        "item_ids": "string (product codes)" if args.string_ids else "int64",
    }
    lat_rows = [{"path": name, **values} for name, values in latency.items()]
    print(table(lat_rows, ["path", "n", "p50_ms", "p99_ms", "p99.9_ms", "mean_ms"]))
    print(table([{"clients": r["clients"], "requests": r["requests"], "req_per_s": r["req_per_s"],
                  "histories_per_s": r["histories_per_s"], "b1_p50_ms": r["good_batch1"].get("p50_ms"),
                  "b1_p99_ms": r["good_batch1"].get("p99_ms"), "b1_p99.9_ms": r["good_batch1"].get("p99.9_ms"),
                  **r["outcomes"]} for r in load_rows],
                ["clients", "requests", "req_per_s", "histories_per_s", "b1_p50_ms", "b1_p99_ms", "b1_p99.9_ms",
                 "ok", "expected_error", "unexpected_error", "mismatch", "lost", "not_sent"]))
    for key, value in summary.items():
        print(f"{key}: {value}")
    out = write_result(args.output, {
        "benchmark": "serving_load",
        "summary": summary,
        "command": command_line(),
        "date": started,
        "started": started,
        "finished": now(),
        "git_commit": git_commit(),
        "machine": {**info, "note": "server, client processes and in-process timing share the same cores "
                                    "(loopback); other jobs may run on them too: see the load averages"},
        "model": {"kind": "molar (quickstart size)", "llm": "qwen2 random init, hidden 64, 2 layers, 2 heads",
                  "sasrec": "d_model 64, 2 layers", "content_dim": args.content_dim,
                  "max_length": config.max_length, "items": prepared.item_cardinality,
                  "trained_epochs": args.train_epochs, "top_k": args.top_k,
                  "max_batch_size": args.max_batch_size},
        "server": f"tritonserver 2.51 bundled in nvidia-pytriton 0.7.0, Python backend, CPU, 127.0.0.1; one model "
                  f"(merlin-systems executor running MolarRecommend: Categorify mapping + lean model), "
                  f"{args.instances} instance(s), 1 torch thread each{', pinned to cores' if args.pin_cores else ''}",
        "load": {"closed_loop": True, "protocol": args.protocol, "requests_per_level": args.requests,
                 "clients": args.clients, "batch_mix": batch_mix, "bad_fraction": args.bad_fraction,
                 "bad_kinds": BAD_KINDS, "sample_every": args.sample_every, "timeout_s": args.timeout,
                 "max_seconds": args.max_seconds, "client_processes": True},
        "latency_batch1": latency,
        "phases": phases,
        "levels": load_rows,
        "server_log_tail": server_log_tail,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
