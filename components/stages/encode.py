"""Stage ``encode``: verbalise, encode and LoRA-tune the text features."""

from __future__ import annotations

import time

import numpy as np

from components.core import tracking
from components.core.config import Config
from components.core.storage import atomic_dir
from components.core.workspace import Paths
from components.data import ingest, kg, split
from components.stages.common import tracked_run


def _log_step(name: str, value: float, step: int) -> None:
    import mlflow

    mlflow.log_metric(name, value, step=step)


def run(paths: Paths, cfg: Config) -> None:
    """Verbalise items and users, encode them (cached), fine-tune with LoRA, save embeddings.

    Logged: a sample of texts, encoding speed and cache hits, the fine-tuning curve (loss and learning
    rate per step), trainable/total parameters, wall time, the adapter, and the frozen-vs-fine-tuned
    validation signal (rank of each held-out user's next item among all items by cosine).
    """
    with tracked_run(paths, cfg, "encode"):
        import mlflow

        from components.core.storage import write_json as save_json
        from components.text import features, pairs, retune
        from components.text.encoder import EmbeddingCache, Encoder, resolve_model
        from components.text.finetune import FinetuneConfig, finetune, validation_signal
        from components.text.verbalise import user_texts

        text = cfg.text
        _, users, items, _ = ingest.read_processed(paths.processed)
        graph = kg.load_graph(paths.graph)
        parts = split.load_split(paths.split)
        cache = EmbeddingCache.for_workspace(paths.root, text.cache_dir)
        ref = resolve_model(text.model)
        mlflow.set_tags({"metarec.text.model": ref.name, "metarec.text.model_fingerprint": ref.fingerprint})
        verbalise = {"max_titles": text.max_titles, "max_shared": text.max_shared}

        frozen = Encoder.configured(text, ref)
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
                train_pairs = retune.training_pairs(parts.train, users, items, item_texts, text)
                ft_cfg = FinetuneConfig.from_section(ft, cfg.seed)
                result = finetune(
                    ref, train_pairs, ft_cfg, tmp / "finetune", log=_log_step, threads=text.threads
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
                encoder = Encoder.configured(text, ref, adapter_dir=tmp / "finetune" / "adapter")
                signals["finetuned"] = validation_signal(encoder, valid, cache=cache)
                mlflow.log_artifacts(str(tmp / "finetune" / "adapter"), artifact_path="adapter")
            start = time.perf_counter()
            item_texts, item_vectors = features.encode_items(
                encoder, items, graph, text.item_template, text.max_facts, cache, **verbalise
            )
            meta = {
                "model": ref.name,
                "fingerprint": encoder.fingerprint,
                "precision": encoder.precision,
                "finetuned": adapter_dir is not None,
                "adapter_dir": str(adapter_dir) if adapter_dir else None,
                "dim": int(item_vectors.shape[1]),
            }
            features.save_embeddings(tmp / "items", list(items.item_id.astype(str)), item_vectors, meta)
            # Profile-only texts (no watched titles): what the model knows of a user before any
            # history, and the only user text that cannot leak the items the model learns to predict.
            _, profile_vectors = features.encode_users(
                encoder, users, parts.train.iloc[:0], items, text.n_recent, text.user_template, cache
            )
            features.save_embeddings(tmp / "profiles", list(users.user_id.astype(str)), profile_vectors, meta)
            seconds = time.perf_counter() - start
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
        # Users' history texts are what fine-tuning aligns with items; the model itself reads a user's
        # history through the item vectors (x̄_u) and the profile, so they are shown, not encoded
        # (100k of them would take ~25 min on 2 cores).
        users_sample = user_texts(users.head(25), parts.train, items, text.n_recent, text.user_template)
        mlflow.log_text("\n".join(users_sample), "text_samples/users.txt")
        mlflow.log_metric("text.encode_seconds", seconds)
        for name, values in signals.items():
            mlflow.log_metrics(
                {f"text.valid.{name}.{tracking.metric_name(k)}": float(v) for k, v in values.items()}
            )
        mlflow.log_dict(signals, "validation_signal.json")
