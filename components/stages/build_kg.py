"""Stage ``build_kg``: the typed heterogeneous graph and its schema picture."""

from __future__ import annotations

from components.core.config import Config
from components.core.workspace import Paths
from components.data import ingest, kg
from components.stages.common import deferred_run


def run(paths: Paths, cfg: Config) -> None:
    """Build and save the typed heterogeneous graph with its schema picture."""
    with deferred_run(paths, cfg, "build_kg") as run:
        _, users, items, triples = ingest.read_processed(paths.processed)
        graph, report = kg.build_graph(
            users,
            items,
            triples,
            cfg.kg.item_fields,
            cfg.kg.user_fields,
            cfg.kg.age_buckets,
            cfg.kg.type_names,
            cfg.kg.optional_item_fields,  # those skipped are listed in report.json
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
