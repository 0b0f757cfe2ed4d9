"""Multi-seed quality runner: datasets x variants x seeds, every model early-stopped on validation NDCG@10.

Each run goes through :func:`merlin_molar.pipeline.train`, the function behind `merlin-molar train`, with the
CLI's default training settings, so the ``sasrec``, ``gru4rec``, ``molar`` and ``molar_gru4rec`` rows are what a
user gets without tuning.
Writes ``benchmarks/results/quality/quality_<dataset>.json`` (top-level ``summary``: mean and std over seeds, and the
per-seed paired ratio to SASRec), a markdown table and a plot. Finished runs are kept in the work directory
and skipped on a rerun, so an interrupted benchmark resumes.

Datasets (read from ``--data-root``, default ``$MOLAR_DATA`` or ``../shared/data`` beside the checkout):

* ``ml-100k``: MovieLens-100K, maximum length 50 (CPU budget; ``--max-length 200`` for the issue's setting);
* ``ml-1m``: MovieLens-1M, maximum length 50 (CPU budget);
* ``ml-1m-sparse``: the sparse proxy for product catalogues: each ML-1M user's last 15 interactions
  (maximum length 15, which holds every history whole, as 50 would).

Example::

    python benchmarks/quality.py --datasets ml-100k --seeds 0,1,2

The SASRec runs of ``benchmarks/sasrec_parity.py`` are the ``sasrec`` variant's runs (same function, data and
settings): ``--sasrec-runs-from`` takes them in after checking that, instead of training them again::

    python benchmarks/quality.py --datasets ml-100k --max-length 200 --variants sasrec,molar --seeds 0,1,2 \
        --suffix _L200 --sasrec-runs-from outputs/sasrec_parity_whole/ml-100k_L200/project

Pretrained encoders and the posters (issue 29; ML-1M, the dataset with images)::

    python benchmarks/quality.py --datasets ml-1m --seeds 0,1,2 --suffix _encoders \
        --variants sasrec,molar,molar_smollm2,molar_images,molar_minilm_images,molar_smollm2_images
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides before T4Rec is imported)
from common import (  # noqa: E402
    command_line, finished_prepare, git_commit, machine, now, result_path, table, write_result,
)

from merlin_molar.data import prepare, read_dataset  # noqa: E402
from merlin_molar.data.readers import RawDataset  # noqa: E402
from merlin_molar.io import read_json, write_json  # noqa: E402
from merlin_molar.models.molar import MolarConfig  # noqa: E402
from merlin_molar.pipeline import embed_item_table, run_identity, train  # noqa: E402
from merlin_molar.training import TrainConfig  # noqa: E402
from merlin_molar.validation import check_model_matches  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "ml-100k": {"source": "ml-100k", "max_length": 50, "last_n": None},
    "ml-1m": {"source": "ml-1m", "max_length": 50, "last_n": None},
    # histories of at most 15 items: length 15 gives the same inputs as 50 at a third of the cost
    "ml-1m-sparse": {"source": "ml-1m", "max_length": 15, "last_n": 15},
}
# name -> (model kind, model options on top of the defaults, the variant whose same-seed run becomes the frozen
# ID branch, or None). "sasrec" and "molar" are the README's recipe with the CLI defaults: `train --model sasrec`,
# then `train --model molar --init-id-branch <sasrec run>/model` (a frozen, trained SASRec as the ID branch, the
# MoE content adaptor, no post-alignment); "gru4rec" and "molar_gru4rec" are the same recipe with GRU4Rec as the
# ID model. "molar_align" adds the paper's post-alignment (alpha 0.1, the default until the length-200 runs).
# The "*_linear*" rows are the ablations measured with the linear adaptor (the default until the MoE rows showed
# it ahead), and like "molar_stage1" they were measured aligned: they pin both, so that their finished runs
# and committed rows stay what they were. Ratios are always to SASRec.
LINEAR = {"content_adaptor": "linear"}
ALIGNED = {"alpha": 0.1}
VARIANTS = {
    "sasrec": ("sasrec", {}, None),
    "gru4rec": ("gru4rec", {}, None),
    "molar": ("molar", {}, "sasrec"),
    "molar_align": ("molar", ALIGNED, "sasrec"),
    "molar_gru4rec": ("molar", {}, "gru4rec"),
    "molar_linear": ("molar", {**LINEAR, **ALIGNED}, "sasrec"),
    "molar_linear_no_align": ("molar", {**LINEAR, "alpha": 0.0}, "sasrec"),
    "molar_linear_gru4rec": ("molar", {**LINEAR, **ALIGNED}, "gru4rec"),
    "molar_linear_joint": ("molar", {**LINEAR, **ALIGNED}, None),
    "molar_linear_fixed_fusion": ("molar", {**LINEAR, **ALIGNED, "id_weight_grid": []}, "sasrec"),
    "molar_linear_align_all": ("molar", {**LINEAR, **ALIGNED, "align_positions": "all"}, "sasrec"),
    "content_only": ("molar", {"id_branch": "none"}, None),
    "content_only_linear": ("molar", {**LINEAR, "id_branch": "none"}, None),
    "molar_stage1": ("molar", ALIGNED, "sasrec"),
    # the recommended recipe ("molar") on the tables of other pretrained encoders (issue 29)
    "molar_smollm2": ("molar", {}, "sasrec"),
    "molar_images": ("molar", {}, "sasrec"),
    "molar_minilm_images": ("molar", {}, "sasrec"),
    "molar_smollm2_images": ("molar", {}, "sasrec"),
    # the DUEG started from SmolLM2's weights, its first 2 of 30 layers (the CPU's variant; issue 29, item 3)
    "molar_dueg_smollm2_l2": ("molar", {"llm": "smollm2", "llm_layers": 2}, "sasrec"),
}
# the item table each variant's content tower reads (default "original": the packaged MiniLM's). "stage1" is the
# MiniLM after MIRM stage 1 (`merlin-molar finetune-items`, as benchmarks/stage1_sentence.py runs it), given with
# --stage1-encoder: the same recipe as "molar" on the tuned table (issue 10, item 5)
VARIANT_TABLES = {"molar_stage1": "stage1", "molar_smollm2": "smollm2", "molar_images": "images",
                  "molar_minilm_images": "minilm_images", "molar_smollm2_images": "smollm2_images"}
# the packaged encoders behind those tables, as `merlin-molar embed-items --encoder` names them (a TEXT+IMAGE one
# joined by its default, the whitening fitted on the catalogue); the posters are ML-1M's
ENCODER_TABLES = {"smollm2": "smollm2", "images": "efficientnet-lite0", "minilm_images": "minilm+efficientnet-lite0",
                  "smollm2_images": "smollm2+efficientnet-lite0"}
# a finished run is reused only if its saved model has the variant's value of each of these (and of each option)
RECIPE_FIELDS = ("content_adaptor", "alpha", "id_weight_grid", "align_positions", "id_branch", "llm", "llm_layers")
BASELINE = "sasrec"  # the ratio column: every variant over the SASRec of the same seed
METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")


def default_data_root() -> Path:
    return Path(os.environ.get("MOLAR_DATA") or REPO.parent / "shared" / "data")


def last_n(raw: RawDataset, n: int) -> RawDataset:
    """Each user's last ``n`` interactions (by time): short histories, as in product catalogues."""
    inter = raw.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    inter = inter.groupby("user_id", sort=False).tail(n).reset_index(drop=True)
    return RawDataset(inter, raw.items, f"{raw.source}#last{n}", list(raw.text_columns))


def prepared_dataset(name: str, data_root: Path, workdir: Path, stage1_encoder: Optional[Path] = None,
                     encoder_tables=()):
    """The dataset's prepared directory and item tables (``{"original": path}``, ``"stage1"`` embedded with
    ``stage1_encoder`` when given, and each of ``encoder_tables``, names of :data:`ENCODER_TABLES`), made once:
    several quality.py processes (variants run
    side by side, one per core) share them, so they are built under a lock and a finished one is reused.
    Preparing again while another process trains from the directory would rewrite its files under it (and two
    NVTabular fits into one ``.categories`` directory crash)."""
    spec = DATASETS[name]
    raw = read_dataset(data_root / spec["source"])
    if spec["last_n"]:
        raw = last_n(raw, spec["last_n"])
    root = workdir / name / f"prepared_L{spec['max_length']}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        prepared = finished_prepare(root, raw, spec["max_length"]) or prepare(raw, root, max_length=spec["max_length"])
        # embed_item_table encodes the catalogue again on every call (ML-1M: ~20 s); the bytes are the same each
        # time (checked: every Molar run saved the same table sha256), and the new directory is swapped in whole
        # (atomic_path), so a run of another process never loads a half-written table
        tables = {"original": embed_item_table(prepared, batch_size=64)}
        if stage1_encoder is not None:
            if not (Path(stage1_encoder) / "molar_stage1.json").exists():
                raise SystemExit(f"quality.py: error: --stage1-encoder: {stage1_encoder} is not a stage-1 encoder "
                                 "(no molar_stage1.json): run benchmarks/stage1_sentence.py or finetune-items first")
            tables["stage1"] = embed_item_table(prepared, root / "item_table_stage1", encoder=str(stage1_encoder),
                                                batch_size=64)
        for table_name in encoder_tables:
            tables[table_name] = encoder_table(prepared, root / f"item_table_{table_name}", ENCODER_TABLES[table_name])
        return prepared, tables


def encoder_table(prepared, path: Path, encoder: str) -> Path:
    """``path``, embedded with ``encoder`` unless it already is (``embed_catalogue`` reuses a table of the same
    plan); the seconds per item of the run that embedded it are kept beside it (``<path>.timing.json``)."""
    details = {}
    embed_item_table(prepared, path, encoder=encoder, batch_size=32, details=details)
    result = details["result"]
    timing = path.with_name(path.name + ".timing.json")
    if not result.reused or not timing.exists():
        write_json(timing, {"encoder": encoder, "items": result.items_encoded, "seconds": round(result.seconds, 1),
                            "seconds_per_item": round(result.seconds / max(result.items_encoded, 1), 4),
                            "reused": result.reused, "machine": machine(), "date": now()})
    return path


def table_record(name: str, path: Path) -> dict:
    """What the result says of an item table: its encoder, join, width, and (for the encoder tables) the seconds
    per item of the run that embedded it."""
    meta = read_json(path / "metadata.json")
    timing = path.with_name(path.name + ".timing.json")
    return {"encoder": meta["encoder"]["name_or_path"], "kind": meta["encoder"]["kind"],
            "fusion": meta["encoder"].get("fusion"), "dim": meta["dim"], "items_embedded": meta["items_embedded"],
            "items_with_image": meta["items_with_image"],
            **({"embedding": read_json(timing)} if timing.exists() else {})}


def run_one(prepared, table, variant: str, seed: int, run_dir: Path, config: TrainConfig) -> dict:
    done = run_dir / "metrics.json"
    if done.exists():
        check_finished_run(run_dir, variant)
        return read_json(done)
    kind, options, id_from = VARIANTS[variant]
    init = run_dir.parent / f"{id_from}-seed{seed}" / "model" if id_from else None
    if init is not None and not init.exists():
        run_one(prepared, table, id_from, seed, init.parent, config)
    result = train(prepared, kind, run_dir, dict(options), config, item_table_path=table if kind == "molar" else None,
                   resume=True,  # an interrupted run continues from its last epoch checkpoint
                   init_id_branch_from=init)
    return {k: v for k, v in result.items() if k != "log_history"}


def import_run(source: Path, run_dir: Path, prepared, variant: str, config: TrainConfig) -> bool:
    """Take in ``source``, a finished run of another benchmark, as ``run_dir`` when it is the run this benchmark
    would make (same data fingerprint, length, model and training settings: :func:`run_identity`; a model that
    maps item ids as ``prepared`` does); False when ``source`` is not finished. Its checkpoints stay behind."""
    import shutil

    if not (source / "metrics.json").is_file():
        return False
    kind, options, id_from = VARIANTS[variant]
    if id_from is not None or kind == "molar":
        raise SystemExit(f"quality.py: error: {variant}: only an ID model's runs can be taken in")
    recorded = read_json(source / "molar_manifest.json")
    expected = run_identity(prepared, kind, dict(options), config)
    if recorded != expected:
        raise SystemExit(f"quality.py: error: {source}: not the run {variant}-seed{config.seed} would be here "
                         f"(recorded {recorded}, expected {expected})")
    check_model_matches(source / "model", prepared, str(source))
    staging = run_dir.with_name(run_dir.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted import
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    write_json(staging / "imported_from.json", {"source": str(source.resolve()), "date": now()})
    staging.rename(run_dir)
    return True


def imported_source(run_dir: Path) -> Optional[str]:
    path = run_dir / "imported_from.json"
    return read_json(path)["source"] if path.is_file() else None


def train_config(args, seed: int) -> TrainConfig:
    # an integral --max-epochs is hashed as an int, as the CLI and sasrec_parity.py give it (run_identity)
    epochs = int(args.max_epochs) if float(args.max_epochs).is_integer() else args.max_epochs
    return TrainConfig(seed=seed, epochs=epochs, logging_steps=10_000, bf16=args.bf16)


def check_finished_run(run_dir: Path, variant: str) -> None:
    """Refuse a finished run whose saved model is not what ``variant`` now means (for example a run made
    before a default changed): its metrics would be reported under the wrong name."""
    kind, options, id_from = VARIANTS[variant]
    if kind != "molar":
        return
    saved = MolarConfig.from_dict(read_json(run_dir / "model" / "molar_model.json")["config"])
    expected = MolarConfig(**options, **({"id_branch": "frozen"} if id_from else {}))
    fields = [f for f in (*RECIPE_FIELDS, *options)
              if not (f == "alpha" and expected.id_branch == "none")]  # no ID branch: nothing to align with
    def value(config, f):  # a saved pretrained DUEG holds its architecture in llm and the name in llm_source
        if f == "llm":
            return config.llm_source or (config.llm if isinstance(config.llm, str) else "random init")
        return getattr(config, f)

    differ = {f: (value(saved, f), value(expected, f)) for f in fields if value(saved, f) != value(expected, f)}
    if differ:
        raise SystemExit(f"quality.py: error: {run_dir}: the finished run is not variant {variant!r} "
                         f"(saved vs expected: {differ}); move it to the variant it is, or delete it")


def mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict, baseline: dict = None) -> dict:
    """{variant: {"seeds": n, "test": {metric: {mean, std}}, "valid": ..., "ratio_to_sasrec": ...}}

    The ratio is to the SASRec of the same seed: ``runs["sasrec"]``, else ``baseline`` (``{seed: result}``, the
    SASRec runs found in the work directory when ``sasrec`` is not among the variants)."""
    summary = {}
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        entry = {"seeds": len(seeds), "seed_list": seeds}
        for split in ("valid", "test"):
            entry[split] = {m: mean_std([by_seed[s][split][m] for s in seeds]) for m in METRICS}
        entry["best_epoch"] = [by_seed[s].get("best_epoch") for s in seeds]
        entry["train_seconds"] = mean_std([by_seed[s]["train_seconds"] for s in seeds])
        base = runs.get(BASELINE) or baseline or {}
        paired = [s for s in seeds if s in base]
        if paired:
            ratios = [by_seed[s]["test"]["ndcg@10"] / base[s]["test"]["ndcg@10"] for s in paired]
            entry["test_ndcg@10_ratio_to_sasrec"] = {**mean_std(ratios), "per_seed": dict(zip(paired, ratios))}
        fusion = [by_seed[s]["fusion"]["id_weight"] for s in seeds if by_seed[s].get("fusion")]
        if fusion:
            entry["chosen_id_weight"] = fusion
        summary[variant] = entry
    return summary


def bf16_over_fp32(runs: dict, fp32_runs_dir: Path) -> dict:
    """Each bf16 run's test NDCG@10 over the fp32 run of the same variant and seed (where that one is finished):
    {variant: {"seeds": [...], "fp32_test_ndcg@10": {mean, std}, "ratio": {mean, std, per_seed}}}."""
    out = {}
    for variant, by_seed in runs.items():
        fp32 = {s: read_json(fp32_runs_dir / f"{variant}-seed{s}" / "metrics.json") for s in sorted(by_seed)
                if (fp32_runs_dir / f"{variant}-seed{s}" / "metrics.json").exists()}
        if fp32:
            ratios = {s: by_seed[s]["test"]["ndcg@10"] / fp32[s]["test"]["ndcg@10"] for s in fp32}
            out[variant] = {"seeds": sorted(fp32),
                            "fp32_test_ndcg@10": mean_std([fp32[s]["test"]["ndcg@10"] for s in fp32]),
                            "bf16_test_ndcg@10": mean_std([by_seed[s]["test"]["ndcg@10"] for s in fp32]),
                            "ratio": {**mean_std(list(ratios.values())), "per_seed": ratios}}
    return out


def markdown(dataset: str, summary: dict) -> str:
    lines = [
        f"### {dataset}: test metrics, mean ± std over seeds (each run early-stopped on valid NDCG@10)",
        "",
        "| variant | seeds | NDCG@10 | Recall@10 | NDCG@20 | Recall@20 | NDCG@10 / SASRec (paired) | best epochs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, e in summary.items():
        cells = [f"{e['test'][m]['mean']:.4f} ± {e['test'][m]['std']:.4f}" for m in METRICS]
        ratio = e.get("test_ndcg@10_ratio_to_sasrec")
        ratio = f"{ratio['mean']:.3f} ± {ratio['std']:.3f}" if ratio else "-"
        epochs = ", ".join(f"{x:g}" if x is not None else "-" for x in e["best_epoch"])
        lines.append(f"| {variant} | {e['seeds']} | " + " | ".join(cells) + f" | {ratio} | {epochs} |")
    return "\n".join(lines) + "\n"


def plot(dataset: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["test"]["ndcg@10"]["mean"] for n in names]
    stds = [summary[n]["test"]["ndcg@10"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.5))
    id_only = [VARIANTS.get(n, ("molar",))[0] != "molar" for n in names]  # SASRec, GRU4Rec: grey
    ax.bar(names, means, yerr=stds, capsize=4, color=["#888" if grey else "#3a7" for grey in id_only])
    ax.set_ylabel("test NDCG@10 (mean ± std)")
    ax.set_title(f"{dataset}: early-stopped, {summary[names[0]]['seeds']} seeds")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--datasets", default="ml-100k", help=f"comma-separated, from {sorted(DATASETS)}")
    p.add_argument("--variants", default="sasrec,molar,molar_align,content_only",
                   help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "quality")
    p.add_argument("--max-epochs", type=float, default=TrainConfig.epochs, help="early stopping decides")
    p.add_argument("--max-length", type=int, help="override the dataset's maximum sequence length")
    p.add_argument("--suffix", default="", help="appended to the result file names")
    p.add_argument("--stage1-encoder", type=Path, default=REPO / "outputs" / "stage1_sentence" / "minilm_stage1",
                   help="the MiniLM after MIRM stage 1, for the *_stage1 variants (benchmarks/stage1_sentence.py "
                        "writes it there)")
    p.add_argument("--bf16", action="store_true",
                   help="train with bf16 autocast (runs under runs_L<length>_bf16); the result also pairs each run "
                        "with the fp32 run of the same variant and seed, where that one is finished")
    p.add_argument("--summary-only", action="store_true",
                   help="only summarise finished runs of the work directory (no data preparation, no training)")
    p.add_argument("--sasrec-runs-from", type=Path,
                   help="finished SASRec runs to take in instead of training them again: a directory of seed<N>/run "
                        "(sasrec_parity.py's <workdir>/<dataset>_L<length>/project), each checked to be the run this "
                        "benchmark would make (data fingerprint, length, model and training settings, item ids); "
                        "the result names them under runs_taken_in")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"quality.py: error: --variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    for dataset in args.datasets.split(","):
        if args.max_length:
            DATASETS[dataset] = {**DATASETS[dataset], "max_length": args.max_length}
        start = time.perf_counter()
        info = machine()
        fp32_runs_dir = args.workdir / dataset / f"runs_L{DATASETS[dataset]['max_length']}"
        runs_dir = fp32_runs_dir.with_name(fp32_runs_dir.name + "_bf16") if args.bf16 else fp32_runs_dir
        if args.summary_only:
            missing = [f"{v}-seed{s}" for s in seeds for v in variants
                       if not (runs_dir / f"{v}-seed{s}" / "metrics.json").exists()]
            if missing:
                raise SystemExit(f"quality.py: error: --summary-only: no finished run in {runs_dir} for {missing}")
            prepared_dir = args.workdir / dataset / f"prepared_L{DATASETS[dataset]['max_length']}"
            manifest = read_json(prepared_dir / "molar_manifest.json")
            prepared, item_tables = None, {}  # every run is finished: run_one only reads its metrics
        else:
            stage1 = args.stage1_encoder if any(VARIANT_TABLES.get(v) == "stage1" for v in variants) else None
            needed = sorted({VARIANT_TABLES[v] for v in variants if VARIANT_TABLES.get(v) in ENCODER_TABLES})
            prepared, item_tables = prepared_dataset(dataset, args.data_root, args.workdir, stage1, needed)
            manifest = prepared.manifest
        runs = {}
        for seed in seeds:
            needs_sasrec = any(v == BASELINE or VARIANTS[v][2] == BASELINE for v in variants)
            sasrec_dir = runs_dir / f"{BASELINE}-seed{seed}"
            if args.sasrec_runs_from and needs_sasrec and not sasrec_dir.exists() and not args.summary_only:
                source = args.sasrec_runs_from / f"seed{seed}" / "run"
                if import_run(source, sasrec_dir, prepared, BASELINE, train_config(args, seed)):
                    print(f"{dataset} {BASELINE} seed {seed}: taken in from {source}", flush=True)
            for variant in variants:
                config = train_config(args, seed)
                run_dir = runs_dir / f"{variant}-seed{seed}"
                item_table = item_tables.get(VARIANT_TABLES.get(variant, "original"))
                runs.setdefault(variant, {})[seed] = run_one(prepared, item_table, variant, seed, run_dir, config)
                r = runs[variant][seed]
                print(f"{dataset} {variant} seed {seed}: test N@10 {r['test']['ndcg@10']:.4f} "
                      f"R@10 {r['test']['recall@10']:.4f} (best epoch {r.get('best_epoch')}, "
                      f"{r['train_seconds']:.0f} s)", flush=True)
        baseline = {s: read_json(runs_dir / f"{BASELINE}-seed{s}" / "metrics.json") for s in seeds
                    if (runs_dir / f"{BASELINE}-seed{s}" / "metrics.json").exists()}
        summary = summarise(runs, baseline)
        sources = {f"{v}-seed{s}": imported_source(runs_dir / f"{v}-seed{s}") for v in runs for s in runs[v]}
        taken_in = {run: source for run, source in sources.items() if source}
        name = f"quality_{dataset.replace('-', '')}{args.suffix}"
        md = markdown(dataset, summary)
        (result_path("quality", f"{name}.md")).write_text(md)
        plot(dataset, summary, result_path("quality", f"{name}.png"))
        write_result(result_path("quality", f"{name}.json"), {
            "benchmark": name,
            "command": command_line(),
            "git_commit": git_commit(),
            "date": now(),
            "machine": {**info, "load_average_at_end": list(os.getloadavg())},
            "dataset": {"name": dataset, **DATASETS[dataset], "manifest": manifest},
            "train_config": {**TrainConfig().__dict__, "epochs": args.max_epochs, "seed": seeds, "bf16": args.bf16},
            "variants": {v: {"kind": VARIANTS[v][0], "options": VARIANTS[v][1], "id_branch_from": VARIANTS[v][2],
                             "id_branch_from_sasrec": VARIANTS[v][2] == "sasrec",
                             "item_table": VARIANT_TABLES.get(v, "original")} for v in variants},
            "item_tables": {name: table_record(name, path) for name, path in item_tables.items()},
            "summary": summary,
            **({"bf16_over_fp32": bf16_over_fp32(runs, fp32_runs_dir)} if args.bf16 else {}),
            "runs": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()},
            **({"runs_taken_in": taken_in} if taken_in else {}),
            "wall_seconds": time.perf_counter() - start,
        })
        print(md)
        rows = [{"variant": v, "test N@10": e["test"]["ndcg@10"]["mean"], "std": e["test"]["ndcg@10"]["std"],
                 "ratio": (e.get("test_ndcg@10_ratio_to_sasrec") or {}).get("mean")} for v, e in summary.items()]
        print(table(rows, ["variant", "test N@10", "std", "ratio"]))


if __name__ == "__main__":
    main()
