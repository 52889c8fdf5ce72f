"""The pipeline's stages: each reads its inputs from the workspace, calls a component, writes outputs.

``dvc.yaml`` runs each of these through ``metarec stage NAME``; every stage opens its own MLflow run
(nested under the training flow's run when the flow started it) and logs what a person needs to
inspect it: the config, the data version, reports and figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components import evaluate, fetch, ingest, kg, split, tracking
from components.storage import atomic_dir, atomic_file, read_json, write_json
from metarec.config import Config, MineConfig, load_config

STAGES = ("fetch", "ingest", "build_kg", "split", "mine", "encode", "train", "evaluate", "export")


@dataclass(frozen=True)
class Paths:
    """Where each stage's outputs live inside a workspace (must match dvc.yaml)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def graph(self) -> Path:
        return self.root / "data" / "graph"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    @property
    def metapaths(self) -> Path:
        return self.root / "data" / "metapaths"

    @property
    def text(self) -> Path:
        return self.root / "data" / "text"

    @property
    def model(self) -> Path:
        return self.root / "models" / "current"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def bundle(self) -> Path:
        return self.root / "models" / "bundle"


def _log_json(name: str, data: Any) -> None:
    import mlflow

    mlflow.log_dict(data, name)


def _log_figure(fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def _run(paths: Paths, cfg: Config, stage: str) -> Any:
    return tracking.stage_run(paths.root, stage, cfg.flat(), cfg.tracking.experiment, cfg.tracking.uri)


def _light_run(paths: Paths, cfg: Config, stage: str) -> Any:
    tr = cfg.tracking
    return tracking.deferred_stage_run(paths.root, stage, cfg.flat(), tr.experiment, tr.uri)


def run_fetch(paths: Paths, cfg: Config) -> None:
    """Materialise the raw dataset files into ``data/raw``."""
    with _light_run(paths, cfg, "fetch") as run:
        result = fetch.fetch(paths.raw, cfg.data.path, cfg.data.name)
        run.log_dict(result.files, "raw_files_sha256.json")
        run.log_param("data.source", cfg.data.path or f"pypi:recbole=={fetch.RECBOLE_VERSION}")


def run_ingest(paths: Paths, cfg: Config) -> None:
    """Validate the raw files and write Parquet tables plus the data report."""
    with _light_run(paths, cfg, "ingest") as run:
        report = ingest.ingest(paths.raw, cfg.data.name, paths.processed, cfg.data.duplicates)
        run.log_dict(report, "data_report.json")
        run.log_metrics(
            {
                "data.n_users": report["n_users"],
                "data.n_items": report["n_items"],
                "data.n_interactions": report["n_interactions"],
                "data.density": report["density"],
                "data.n_triples": report["n_triples"],
            }
        )
        run.log_figure(data_report_figure(paths.processed, report), "data_report.png")


def data_report_figure(processed: Path, report: dict[str, Any]) -> Any:
    """Histograms of interactions per user and per item, and triples per KG relation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inter = pd.read_parquet(processed / "interactions.parquet", columns=["user", "item"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].hist(inter.groupby("user").size(), bins=50, color="#f4a261")
    axes[0].set(title="interactions per user", xlabel="interactions", ylabel="users", yscale="log")
    axes[1].hist(inter.groupby("item").size(), bins=50, color="#2a9d8f")
    axes[1].set(title="interactions per item", xlabel="interactions", ylabel="items", yscale="log")
    rel = report["triples_per_relation"]
    if rel:
        names = sorted(rel, key=rel.get)
        axes[2].barh([n.split(".", 1)[-1] for n in names], [rel[n] for n in names], color="#264653")
        axes[2].set(title="KG triples per relation", xscale="log")
        axes[2].tick_params(axis="y", labelsize=7)
    else:
        axes[2].text(0.5, 0.5, "no knowledge graph", ha="center")
        axes[2].axis("off")
    fig.suptitle(
        f"{report['dataset']}: {report['n_users']:,} users, {report['n_items']:,} items, "
        f"{report['n_interactions']:,} interactions (density {report['density']:.4f})"
    )
    fig.tight_layout()
    return fig


def run_build_kg(paths: Paths, cfg: Config) -> None:
    """Build and save the typed heterogeneous graph with its schema picture."""
    with _light_run(paths, cfg, "build_kg") as run:
        _, users, items, triples = ingest.read_processed(paths.processed)
        graph, report = kg.build_graph(
            users,
            items,
            triples,
            cfg.kg.item_fields,
            cfg.kg.user_fields,
            cfg.kg.age_buckets,
            cfg.kg.type_names,
        )
        kg.save_graph(graph, paths.graph, report)
        run.log_artifact(str(paths.graph / "schema.png"))
        run.log_artifact(str(paths.graph / "report.json"), artifact_path="graph")
        run.log_metrics(
            {
                "graph.node_types": len(graph.node_ids),
                "graph.relations": len(graph.relations),
                "graph.edges": sum(int(r.matrix.nnz) for r in graph.relations.values()),
            }
        )


def run_split(paths: Paths, cfg: Config) -> None:
    """Split interactions into train/valid/test."""
    with _light_run(paths, cfg, "split") as run:
        inter, *_ = ingest.read_processed(paths.processed)
        parts = split.split_interactions(inter, cfg.split)
        split.save_split(parts, paths.split, {"protocol": cfg.split.protocol, "seed": cfg.seed})
        stats = read_json(paths.split / "stats.json")
        run.log_dict(stats, "split_stats.json")
        run.log_metrics({f"split.{p}.interactions": stats[p]["interactions"] for p in split.PARTS})


Miner = Callable[[Path, Path, MineConfig, int], dict[str, Any]]


def run_mine(paths: Paths, cfg: Config, miner: Miner) -> None:
    """Mine metapaths with ``miner`` (the Prefect flow), export candidate features, log the report."""
    with _run(paths, cfg, "mine"):
        import mlflow

        from components.metapaths import mining, report

        start = time.perf_counter()
        result = miner(paths.graph, paths.split, cfg.mine, cfg.seed)
        mine_seconds = time.perf_counter() - start
        features = None
        if not result["selected"]:
            mlflow.set_tag(
                "metarec.metapaths.warning", "no metapath improved validation NDCG; no features exported"
            )
        elif cfg.mine.candidates_per_user:
            ctx = mining.load_context(mining.ContextSpec.for_inputs(paths.graph, paths.split, cfg.mine))
            schema = ctx.counter.graph.schema
            from components.metapaths.schema import parse

            selected = [(parse(s["id"], schema), float(s["weight"])) for s in result["selected"]]
            features = mining.candidate_features(
                ctx.counter, selected, ctx.train, cfg.mine.candidates_per_user, cfg.mine.block_size
            )
        report.save(paths.metapaths, result, features)
        mlflow.log_artifact(str(paths.metapaths / report.METAPATHS_FILE))
        mlflow.log_artifact(str(paths.metapaths / report.CHART_FILE))
        mlflow.log_text(report.table(result), "metapaths_table.md")
        mlflow.log_dict({"steps": result["steps"]}, "selection_steps.json")
        metrics = {
            "mine.candidates": len(result["candidates"]),
            "mine.selected": len(result["selected"]),
            "mine.seconds": mine_seconds,
            "mine.pop_valid_ndcg_at_10": result["pop_valid_ndcg@10"],
        }
        if result["combined_valid_ndcg@10"] is not None:
            metrics["mine.combined_valid_ndcg_at_10"] = result["combined_valid_ndcg@10"]
        mlflow.log_metrics(metrics)
        mlflow.set_tag("metarec.metapaths.selected", " ; ".join(s["name"] for s in result["selected"]))


def explain_pair(paths: Paths, user_id: str, item_id: str, top_n: int = 3) -> list[dict[str, Any]]:
    """Path instances connecting a user to an item along the workspace's selected metapaths."""
    from components.metapaths import mining, report
    from components.metapaths.explain import Namer, explain

    if not (paths.metapaths / report.METAPATHS_FILE).exists():
        raise FileNotFoundError(f"no mined metapaths in {paths.metapaths}; run `metarec run` first")
    cfg = load_config(paths.params)
    # Score with the weighting the metapaths were mined with, even if params.yaml changed since.
    mined = read_json(paths.metapaths / report.METAPATHS_FILE)
    mine_cfg = cfg.mine.model_copy(update={"weighting": mined["weighting"], "damping": mined["damping"]})
    ctx = mining.load_context(mining.ContextSpec.for_inputs(paths.graph, paths.split, mine_cfg))
    graph = ctx.counter.graph
    users = {u: k for k, u in enumerate(graph.node_ids["user"])}
    items = {i: k for k, i in enumerate(graph.node_ids["item"])}
    if user_id not in users:
        raise ValueError(f"unknown user id {user_id!r}")
    if item_id not in items:
        raise ValueError(f"unknown item id {item_id!r}")
    selected = [p for p, _ in report.load_selected(paths.metapaths, graph.schema)]
    namer = Namer(graph, pd.read_parquet(paths.processed / "items.parquet"))
    return explain(ctx.counter, selected, users[user_id], items[item_id], namer, top_n)


def _log_step(name: str, value: float, step: int) -> None:
    import mlflow

    mlflow.log_metric(name, value, step=step)


def run_encode(paths: Paths, cfg: Config) -> None:
    """Verbalise items and users, encode them (cached), fine-tune with LoRA, save embeddings.

    Logged: a sample of texts, encoding speed and cache hits, the fine-tuning curve (loss and learning
    rate per step), trainable/total parameters, wall time, the adapter, and the frozen-vs-fine-tuned
    validation signal (rank of each held-out user's next item among all items by cosine).
    """
    with _run(paths, cfg, "encode"):
        import mlflow

        from components.storage import write_json as save_json
        from components.text import features, pairs
        from components.text.encoder import EmbeddingCache, Encoder, resolve_model
        from components.text.finetune import FinetuneConfig, finetune, validation_signal

        text = cfg.text
        _, users, items, _ = ingest.read_processed(paths.processed)
        graph = kg.load_graph(paths.graph)
        parts = split.load_split(paths.split)
        cache = EmbeddingCache(
            Path(text.cache_dir) if text.cache_dir else paths.root / ".cache" / "text-embeddings"
        )
        ref = resolve_model(text.model)
        mlflow.set_tags({"metarec.text.model": ref.name, "metarec.text.model_fingerprint": ref.fingerprint})
        verbalise = {"max_titles": text.max_titles, "max_shared": text.max_shared}

        frozen = Encoder(ref, text.max_length, text.batch_size, text.threads)
        start = time.perf_counter()
        item_texts, _ = features.encode_items(
            frozen, items, graph, text.item_template, text.max_facts, cache, **verbalise
        )
        mlflow.log_metric("text.frozen_item_encode_seconds", time.perf_counter() - start)
        sample = "\n".join(item_texts[:25])
        mlflow.log_text(sample, "text_samples/items.txt")

        valid = pairs.holdout_pairs(
            parts.train, parts.valid, users, items, item_texts, text.n_recent, text.user_template
        )
        rng = np.random.default_rng(cfg.seed)
        if len(valid) > text.finetune.valid_users:
            valid = valid.subset(
                np.sort(rng.choice(len(valid), size=text.finetune.valid_users, replace=False))
            )
        signals = {"frozen": validation_signal(frozen, valid, cache=cache)}

        encoder, adapter_dir = frozen, None
        with atomic_dir(paths.text) as tmp:
            ft = text.finetune
            if ft.enabled:
                train_pairs = pairs.next_item_pairs(
                    parts.train,
                    users,
                    items,
                    item_texts,
                    text.n_recent,
                    text.user_template,
                    max_per_user=ft.max_pairs_per_user,
                )
                ft_cfg = FinetuneConfig(
                    r=ft.r,
                    alpha=ft.alpha,
                    dropout=ft.dropout,
                    lr=ft.lr,
                    steps=ft.steps,
                    batch_size=ft.batch_size,
                    temperature=ft.temperature,
                    warmup_steps=ft.warmup_steps,
                    seed=cfg.seed,
                    max_length=ft.max_length,
                    checkpoint_every=ft.checkpoint_every,
                )
                result = finetune(
                    ref,
                    train_pairs,
                    ft_cfg,
                    tmp / "finetune",
                    log=_log_step,
                    threads=text.threads,
                )
                mlflow.log_metrics(
                    {
                        "finetune.trainable_params": result.trainable_params,
                        "finetune.total_params": result.total_params,
                        "finetune.wall_seconds": result.wall_s,
                        "finetune.pairs": len(train_pairs),
                    }
                )
                adapter_dir = paths.text / "finetune" / "adapter"  # where it lands after the rename
                encoder = Encoder(
                    ref,
                    text.max_length,
                    text.batch_size,
                    text.threads,
                    adapter_dir=tmp / "finetune" / "adapter",
                )
                signals["finetuned"] = validation_signal(encoder, valid, cache=cache)
                mlflow.log_artifacts(str(tmp / "finetune" / "adapter"), artifact_path="adapter")
            start = time.perf_counter()
            item_texts, item_vectors = features.encode_items(
                encoder, items, graph, text.item_template, text.max_facts, cache, **verbalise
            )
            user_texts, user_vectors = features.encode_users(
                encoder, users, parts.train, items, text.n_recent, text.user_template, cache
            )
            seconds = time.perf_counter() - start
            meta = {
                "model": ref.name,
                "fingerprint": encoder.fingerprint,
                "finetuned": adapter_dir is not None,
                "adapter_dir": str(adapter_dir) if adapter_dir else None,
                "dim": int(item_vectors.shape[1]),
            }
            features.save_embeddings(tmp / "items", list(items.item_id.astype(str)), item_vectors, meta)
            features.save_embeddings(tmp / "users", list(users.user_id.astype(str)), user_vectors, meta)
            # Profile-only texts (no watched titles): what the model knows of a user before any
            # history, and the only user text that cannot leak the items the model learns to predict.
            _, profile_vectors = features.encode_users(
                encoder, users, parts.train.iloc[:0], items, text.n_recent, text.user_template, cache
            )
            features.save_embeddings(tmp / "profiles", list(users.user_id.astype(str)), profile_vectors, meta)
            if adapter_dir is not None:
                # The frozen encoder's vectors (cache hits) for the frozen-vs-fine-tuned ablation.
                _, frozen_items = features.encode_items(
                    frozen, items, graph, text.item_template, text.max_facts, cache, **verbalise
                )
                _, frozen_profiles = features.encode_users(
                    frozen, users, parts.train.iloc[:0], items, text.n_recent, text.user_template, cache
                )
                frozen_meta = {**meta, "fingerprint": frozen.fingerprint, "finetuned": False}
                ids = list(items.item_id.astype(str))
                features.save_embeddings(tmp / "frozen" / "items", ids, frozen_items, frozen_meta)
                user_ids = list(users.user_id.astype(str))
                features.save_embeddings(tmp / "frozen" / "profiles", user_ids, frozen_profiles, frozen_meta)
            save_json(tmp / "validation_signal.json", signals)
        mlflow.log_text("\n".join(user_texts[:25]), "text_samples/users.txt")
        mlflow.log_metric("text.encode_seconds", seconds)
        for name, values in signals.items():
            mlflow.log_metrics(
                {f"text.valid.{name}.{tracking.metric_name(k)}": float(v) for k, v in values.items()}
            )
        mlflow.log_dict(signals, "validation_signal.json")


@dataclass
class Loaded:
    """Everything a model stage needs: indices, matrices and id tables."""

    users: pd.DataFrame
    items: pd.DataFrame
    data: evaluate.EvalData


def load_parts(paths: Paths) -> Loaded:
    """Read the id tables and the split as binary matrices."""
    users = pd.read_parquet(paths.processed / "users.parquet")
    items = pd.read_parquet(paths.processed / "items.parquet")
    parts = split.load_split(paths.split)
    n_u, n_i = len(users), len(items)
    data = evaluate.EvalData(*(split.to_matrix(parts.part(p), n_u, n_i) for p in split.PARTS))
    return Loaded(users, items, data)


def model_params(cfg: Config) -> dict[str, Any]:
    """The constructor parameters of the configured model."""
    name = cfg.model.name
    sub = getattr(cfg.model, name, None)
    return sub.model_dump() if sub is not None else {}


def load_trained(directory: Path) -> Any:
    """Load any trained model directory: the fusion model or a baseline."""
    meta = json.loads((Path(directory) / "model.json").read_text(encoding="utf-8"))
    if meta.get("name") == "metarec":
        from components.model.recommender import MetarecRecommender

        return MetarecRecommender.load(Path(directory))
    from components import baselines  # torch: imported only by the stages that need it

    return baselines.load_model(Path(directory))


def fit_data(paths: Paths, frozen: bool = False) -> Any:
    """The fusion model's inputs from this workspace's stage outputs."""
    from components.model.fit import load_fit_data

    return load_fit_data(paths.processed, paths.graph, paths.split, paths.metapaths, paths.text, frozen)


def fit_metarec(data: Any, cfg: Config, log: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train the fusion model, logging each epoch's loss and validation metrics when ``log``."""
    import mlflow

    from components.model.fit import fit

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        mlflow.log_metrics({f"epoch.{tracking.metric_name(k)}": v for k, v in row.items()}, step=epoch)

    return fit(
        data,
        cfg.model.metarec,
        cfg.mine.weighting,
        cfg.mine.damping,
        cfg.seed,
        on_epoch if log else None,
        config=cfg.model_dump(mode="json"),
        age_buckets=list(cfg.kg.age_buckets),
        eval_metric=cfg.eval.primary,
    )


def run_train(paths: Paths, cfg: Config) -> None:
    """Fit the configured model on the training part and save it with its config."""
    with _run(paths, cfg, "train"):
        import mlflow

        start = time.perf_counter()
        if cfg.model.name == "metarec":
            model, summary = fit_metarec(fit_data(paths), cfg)
            mlflow.log_metrics(
                {
                    "train.best_epoch": summary["best_epoch"],
                    "train.epochs_run": summary["epochs_run"],
                    "train.fit_targets": summary["fit_targets"],
                }
            )
            mlflow.log_dict({k: v for k, v in summary.items()}, "train_summary.json")
            mlflow.set_tag("metarec.model.channels", " ; ".join(summary["channels"]))
        else:
            loaded = load_parts(paths)
            params = model_params(cfg)
            if cfg.model.name == "bpr":
                params["on_epoch"] = lambda epoch, loss: mlflow.log_metric("train.loss", loss, step=epoch)
            from components import baselines  # torch: imported only by the stages that need it

            model = baselines.build_model(cfg.model.name, params, cfg.seed)
            model.fit(loaded.data.train)
        mlflow.log_metric("train.seconds", time.perf_counter() - start)
        with atomic_dir(paths.model) as tmp:
            model.save(tmp)
            write_json(tmp / "config.json", cfg.model_dump(mode="json"))
        mlflow.log_artifacts(str(paths.model), artifact_path="model")


def cold_protocol(paths: Paths, cfg: Config, loaded: Loaded, frozen: bool = False) -> dict[str, Any]:
    """Refit the configured model with a seeded share of items made cold and evaluate it there.

    Returns the cold-items-only ranking metrics (``cold``) and the warm test metrics of the refitted
    model ranking the full catalogue, cold items included (``mixed``).
    """
    from components import coldstart

    data = loaded.data
    cold = coldstart.cold_item_split(data.train, data.valid, data.test, cfg.eval.cold_fraction, cfg.seed)
    if cfg.model.name == "metarec":
        model, _ = fit_metarec(fit_data(paths, frozen).without_items(cold.cold_items), cfg, log=False)
    else:
        from components import baselines

        model = baselines.build_model(cfg.model.name, model_params(cfg), cfg.seed).fit(cold.train)
    result = coldstart.evaluate_cold(
        lambda block: model.score(block, history=cold.train), cold, cfg.eval.ks, seed=cfg.seed
    )
    mixed = evaluate.evaluate(
        model,
        evaluate.EvalData(cold.train, cold.valid, data.test),
        "test",
        cfg.eval.ks,
        cfg.eval.activity_buckets,
        cfg.eval.block_size,
    )
    return {"cold": result, "mixed": mixed["overall"]}


def run_evaluate(paths: Paths, cfg: Config) -> dict[str, Any]:
    """Evaluate the trained model on valid and test; write metrics.json and log everything."""
    with _run(paths, cfg, "evaluate"):
        import mlflow

        loaded = load_parts(paths)
        model = load_trained(paths.model)
        results = {
            part: evaluate.evaluate(
                model, loaded.data, part, cfg.eval.ks, cfg.eval.activity_buckets, cfg.eval.block_size
            )
            for part in ("valid", "test")
        }
        summary: dict[str, Any] = {
            "model": cfg.model.name,
            "valid": results["valid"]["overall"],
            "test": results["test"]["overall"],
        }
        if cfg.eval.cold_fraction > 0:
            try:
                cold = cold_protocol(paths, cfg, loaded)
            except ValueError as err:  # e.g. no test user on a cold item in a tiny dataset
                mlflow.set_tag("metarec.cold.skipped", str(err))
            else:
                results["cold"] = cold
                summary["cold"] = cold["cold"]["overall"]
                summary["mixed"] = cold["mixed"]
                mlflow.log_metrics(
                    {f"cold.{tracking.metric_name(k)}": float(v) for k, v in cold["cold"]["overall"].items()}
                    | {f"mixed.{tracking.metric_name(k)}": float(v) for k, v in cold["mixed"].items()}
                )
        for part, result in ((p, results[p]) for p in ("valid", "test")):
            mlflow.log_metrics(
                {
                    tracking.metric_name(k): v
                    for k, v in evaluate.flat_metrics(result, part).items()
                    if np.isfinite(v)
                }
            )
        _log_json("evaluation.json", results)
        _log_figure(slice_figure(results["test"], cfg.eval.primary, cfg.model.name), "test_slices.png")
        # Files last: a failure above leaves the previous metrics and evaluation side by side.
        write_json(paths.evaluation, results)
        write_json(paths.metrics, summary)
        return summary


def run_export(paths: Paths, cfg: Config) -> None:
    """Export the fusion model to the ONNX serving bundle (``models/bundle``), failing on a parity breach.

    A baseline writes only a skip marker there: only the fusion model is served and registered. The
    bundle is renamed into place only after every check passed, so a failure keeps the previous one.
    Logged: the parity numbers, scorer latency, encoder throughput, file sizes and the model card.
    """
    with _run(paths, cfg, "export"):
        import mlflow

        from components import export

        if cfg.model.name != "metarec":
            with atomic_dir(paths.bundle) as tmp:
                export.write_skip(tmp, cfg.model.name)
            mlflow.set_tag("metarec.export.skipped", f"model.name={cfg.model.name}")
            return
        start = time.perf_counter()
        with export.make_work_dir(paths) as work, atomic_dir(paths.bundle) as tmp:
            manifest = export.export_bundle(paths, cfg, tmp, Path(work))
        metrics = manifest["metrics"]
        mlflow.log_metrics(
            {
                f"export.{section}.{key}": float(value)
                for section in ("parity", "latency", "sizes")
                for key, value in metrics[section].items()
                if isinstance(value, int | float)
            }
            | {"export.seconds": time.perf_counter() - start}
        )
        mlflow.log_text(manifest["model_card"], "model_card.md")
        mlflow.log_dict(metrics, "bundle_metrics.json")


def evaluate_variant(paths: Paths, cfg: Config, frozen: bool = False) -> dict[str, Any]:
    """Fit the configured model (in memory, nothing saved) and evaluate it warm and cold.

    Returns valid/test/cold/mixed overall metrics and the fit summary; the caller logs them.
    """
    loaded = load_parts(paths)
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    if cfg.model.name == "metarec":
        model, summary = fit_metarec(fit_data(paths, frozen), cfg, log=False)
    else:
        from components import baselines

        model = baselines.build_model(cfg.model.name, model_params(cfg), cfg.seed).fit(loaded.data.train)
    out: dict[str, Any] = {"fit_seconds": time.perf_counter() - start}
    for part in ("valid", "test"):
        result = evaluate.evaluate(model, loaded.data, part, cfg.eval.ks, cfg.eval.activity_buckets)
        out[part] = result["overall"]
    if cfg.eval.cold_fraction > 0:
        cold = cold_protocol(paths, cfg, loaded, frozen)
        out["cold"] = cold["cold"]["overall"]
        out["cold_random"] = {k: v for k, v in cold["cold"].items() if k.startswith("random_recall@")}
        out["mixed"] = cold["mixed"]
    out["best_epoch"] = summary.get("best_epoch")
    return out


def slice_figure(result: dict[str, Any], metric: str, model: str) -> Any:
    """Bar chart of one metric overall and per slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["overall", *result["slices"]]
    values = [result["overall"][metric], *(result["slices"][s].get(metric, np.nan) for s in result["slices"])]
    users = [result["overall"]["n_users"], *(result["slices"][s]["n_users"] for s in result["slices"])]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(names, values, color=["#264653"] + ["#2a9d8f"] * (len(names) - 1))
    for bar, n in zip(bars, users, strict=True):
        ax.annotate(
            f"n={int(n)}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(title=f"{model}: test {metric} by slice", ylabel=metric)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    return fig


def _csv_text(text: str | None) -> str:
    if text is None:
        return ""
    return '"' + text.replace('"', '""') + '"'


def offline_explainer(paths: Paths, model: Any) -> Any:
    """The serving explainer over this workspace's graph and training history (fusion model only)."""
    from components.bundle import Explainer
    from components.metapaths.explain import Namer

    graph = kg.with_interactions(kg.load_graph(paths.graph), model.train)
    return Explainer(graph, Namer(graph, pd.read_parquet(paths.processed / "items.parquet")))


def explain_items(
    explainer: Any,
    model: Any,
    source_of: Callable[[Any], np.ndarray | None],
    user: int | None,
    items: np.ndarray,
    contrib: np.ndarray,
) -> list[str | None]:
    """Top metapath instance per item, trying channels by contribution (``contrib``: items × channels).

    ``source_of(channel)`` gives the user's source row for a channel (history or attribute one-hot),
    or None when the user has none.
    """
    from components.metapaths.schema import parse

    schema = explainer.graph.schema
    notes: list[str | None] = [None] * len(items)
    for j, item in enumerate(items):
        for c in np.argsort(-contrib[j]):
            channel = model.bank.channels[int(c)]
            if contrib[j, c] <= 0 or channel.kind != "metapath" or not channel.metapath_id:
                continue
            source = source_of(channel)
            if source is None:
                continue
            path = parse(channel.metapath_id, schema)
            start = -1 if user is None else user
            text = explainer.instances(path, np.asarray(source, np.float64), np.asarray([item]), start)[0]
            if text is not None:
                notes[j] = text
                break
    return notes


def _row(matrix: sp.csr_matrix | None) -> np.ndarray | None:
    return None if matrix is None else np.asarray(matrix.toarray()).ravel()


def recommend(
    paths: Paths,
    k: int,
    out: Path,
    user_ids: list[str] | None = None,
    block_size: int = 1024,
    explain: bool = False,
) -> int:
    """Write top-k recommendations (original ids) for all or some users; return the number of rows.

    Items the user interacted with in train or valid are excluded, as in test evaluation. With
    ``explain`` (fusion model only) each row carries the top metapath instance behind the item.
    """
    from components.ranking import PAD, topk_items

    loaded = load_parts(paths)
    model = load_trained(paths.model)
    if explain and getattr(model, "name", "") != "metarec":
        raise ValueError("--explain needs the fusion model (model.name=metarec)")
    n_items = len(loaded.items)
    if not 1 <= k <= n_items:
        raise ValueError(f"--k must be in 1..{n_items}, got {k}")
    index = dict(zip(loaded.users.user_id.astype(str), loaded.users.user, strict=True))
    if user_ids is None:
        users = loaded.users.user.to_numpy()
    else:
        unknown = [u for u in user_ids if u not in index]
        if unknown:
            raise ValueError(f"unknown user ids: {', '.join(unknown[:10])}")
        users = np.asarray([index[u] for u in user_ids])
    exclude = loaded.data.exclusions("test")
    item_ids = loaded.items.item_id.astype(str).to_numpy()
    user_id_of = loaded.users.user_id.astype(str).to_numpy()
    explainer = offline_explainer(paths, model) if explain else None
    rows = 0
    with atomic_file(out) as handle:
        handle.write("user_id,item_id,rank,score" + (",explanation\n" if explain else "\n"))
        for start in range(0, len(users), block_size):
            block = users[start : start + block_size]
            scores = model.score(block, history=loaded.data.train)
            topk = topk_items(scores, k, exclude[block])
            for r, user in enumerate(block):
                items = topk[r][topk[r] != PAD]
                notes: list[str | None] = [None] * len(items)
                if explainer is not None:
                    contrib = model.contributions(np.full(len(items), user), items)

                    def source_of(channel: Any, u: int = int(user)) -> np.ndarray | None:
                        if channel.source == "history":
                            return _row(model.train[u])
                        return _row(model.bank.user_attributes[channel.source][u])

                    notes = explain_items(explainer, model, source_of, int(user), items, contrib)
                for rank, (item, note) in enumerate(zip(items, notes, strict=True), start=1):
                    line = f"{user_id_of[user]},{item_ids[item]},{rank},{scores[r, item]:.6g}"
                    handle.write(line + (f",{_csv_text(note)}\n" if explain else "\n"))
                    rows += 1
    return rows


def recommend_cold(
    paths: Paths, k: int, profile: dict[str, str], history: list[str], explain: bool = True
) -> list[dict[str, Any]]:
    """Top-k for a user unknown to the model, from a profile (demographics) and/or item history."""
    model = load_trained(paths.model)
    if getattr(model, "name", "") != "metarec":
        raise ValueError("cold users need the fusion model (model.name=metarec)")
    cfg = load_config(paths.params)
    items = pd.read_parquet(paths.processed / "items.parquet")
    index = {str(i): n for n, i in enumerate(items.item_id.astype(str))}
    unknown = [h for h in history if h not in index]
    if unknown:
        raise ValueError(f"unknown item ids in --history: {', '.join(unknown[:10])}")
    n_items = len(items)
    if not 1 <= k <= n_items:
        raise ValueError(f"--k must be in 1..{n_items}, got {k}")
    row = sp.csr_matrix(
        (np.ones(len(history), np.float32), ([0] * len(history), [index[h] for h in history])),
        shape=(1, n_items),
    )
    vector = np.zeros((1, model.profile.shape[1]), dtype=np.float32)
    if profile:
        from components.text.encoder import Encoder, resolve_model
        from components.text.verbalise import user_texts

        frame = pd.DataFrame([{"user": 0, "user_id": "new", **profile}])
        empty = pd.DataFrame({"user": [], "item": [], "timestamp": []})
        text = user_texts(frame, empty, items, cfg.text.n_recent, cfg.text.user_template)
        adapter = paths.text / "finetune" / "adapter"
        encoder = Encoder(
            resolve_model(cfg.text.model),
            cfg.text.max_length,
            cfg.text.batch_size,
            cfg.text.threads,
            adapter_dir=adapter if adapter.exists() else None,
        )
        vector = encoder.encode(text)
    attributes = model.bank.profile_attributes(profile)
    scores = model.score_rows(row, vector, attributes=attributes)[0].astype(np.float64)
    scores[[index[h] for h in history]] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, int(np.isfinite(scores).sum()))]
    notes: list[str | None] = [None] * len(top)
    if explain:
        feats = model.bank.rows(row, None, attributes)[0]
        import torch

        with torch.no_grad():
            user_vec = model.net.user_vector(torch.from_numpy(row.toarray()), torch.from_numpy(vector))
            gates = torch.nn.functional.softplus(
                model.net.path_bias + user_vec @ model.net.path_user
            ).numpy()[0]
        contrib = (gates[:, None] * feats[:, top]).T
        explainer = offline_explainer(paths, model)

        def source_of(channel: Any) -> np.ndarray | None:
            return _row(row if channel.source == "history" else attributes.get(channel.source))

        notes = explain_items(explainer, model, source_of, None, top, contrib)
    ids = items.item_id.astype(str).to_numpy()
    return [
        {"item_id": ids[i], "rank": r, "score": float(scores[i]), "explanation": notes[r - 1]}
        for r, i in enumerate(top, start=1)
    ]


def run_stage(name: str, workspace: Path, miner: Miner | None = None) -> None:
    """Run one stage by name in a workspace (the entry point of ``metarec stage NAME``).

    ``miner`` runs the mining flow; the CLI passes the Prefect flow so components stay free of flows.
    """
    paths = Paths(Path(workspace).resolve())
    cfg = load_config(paths.params)
    if name == "mine":
        if miner is None:
            raise ValueError("stage mine needs a miner (run it through `metarec stage mine`)")
        run_mine(paths, cfg, miner)
        return
    runners = {
        "fetch": run_fetch,
        "ingest": run_ingest,
        "build_kg": run_build_kg,
        "split": run_split,
        "encode": run_encode,
        "train": run_train,
        "evaluate": run_evaluate,
        "export": run_export,
    }
    if name not in runners:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    runners[name](paths, cfg)


def read_metrics(paths: Paths) -> dict[str, Any]:
    """Read ``metrics.json`` written by the evaluate stage."""
    return dict(json.loads(paths.metrics.read_text(encoding="utf-8")))
