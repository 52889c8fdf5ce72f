"""Stage ``retune``: the cold-item protocol's encoder, fine-tuned without the cold items' interactions.

The evaluate stage's cold protocol refits the model on a split in which a seeded share of items is
cold; its text side must come from an encoder that never learnt from those items (see
:mod:`components.text.retune`). Fine-tuning that encoder and re-encoding every item is training work
(minutes at 20k items), so it is a stage of its own: DVC caches its output, and evaluate reads it when
the request matches. When the protocol does not retune (a baseline, ``eval.cold_fraction: 0``,
``eval.cold_finetune`` or fine-tuning off) the stage only records why.
"""

from __future__ import annotations

import time

from components.core.config import Config
from components.core.storage import atomic_dir, write_json
from components.core.workspace import Paths
from components.stages.common import tracked_run


def skip_reason(cfg: Config) -> str:
    """Why the evaluate stage needs no retuned encoder ("" when it does)."""
    from components.model.facade import cold_retunes

    if cfg.eval.cold_fraction <= 0:
        return "eval.cold_fraction is 0: no cold-item protocol"
    if cfg.model.name != "metarec":
        return f"model.name={cfg.model.name}: a baseline reads no text"
    if not cold_retunes(cfg):
        return (
            "eval.cold_finetune or text.finetune.enabled is off: the protocol uses the encode stage's encoder"
        )
    return ""


def run(paths: Paths, cfg: Config) -> None:
    """Fine-tune the encoder on the cold split's training part, embed every item and profile, save them."""
    with tracked_run(paths, cfg, "retune"):
        import mlflow

        from components.data import split
        from components.model.facade import cold_split, load_parts, retuned_text
        from components.model.fit import drop_items
        from components.text import retune

        reason = skip_reason(cfg)
        with atomic_dir(paths.retune) as tmp:
            if reason:
                mlflow.set_tag("metarec.retune.skipped", reason)
                write_json(tmp / retune.RETUNE_JSON, {"retuned": False, "reason": reason})
                return
            start = time.perf_counter()
            loaded = load_parts(paths)
            cold = cold_split(cfg, loaded)
            train = drop_items(split.load_split(paths.split).train, cold.cold_items, len(loaded.items))
            result = retuned_text(paths, cfg, train, stage_output=False)
            retune.save(
                tmp, result, list(loaded.items.item_id.astype(str)), list(loaded.users.user_id.astype(str))
            )
            mlflow.log_metrics(
                {
                    "retune.pairs": result.n_pairs,
                    "retune.cold_items": len(cold.cold_items),
                    "retune.adapter_cached": float(result.cached),
                    "retune.seconds": time.perf_counter() - start,
                }
            )
