"""The ``retrain`` flow: feedback → new DVC data version → training subflow → challenger → gate.

Triggered by the ``metarec.drift.detected`` event (the deployment trigger in ``flows/deploy.py``), by
the nightly schedule, by ``metarec retrain`` or inline by the monitor. One retrain runs at a time per
workspace (a file lock), and a window already retrained returns its recorded result without training
again, so a trigger that fires twice (event and fallback, a retried automation) retrains once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.core.workspace import workspace_config
from components.drift import reference as monitoring
from components.retrain import (
    DataVersion,
    DataVersions,
    append_version,
    ensure_base,
    feedback_after,
    push_pending,
)


@task(name="snapshot-feedback", cache_policy=NO_CACHE)
def snapshot_feedback(
    versions: DataVersions, url: str, window: str
) -> tuple[dict[str, Any] | None, dict[str, int], str]:
    """Append the feedback after the latest data version as a new one (``dvc add``-ed).

    With ``data.remote`` set, versions not yet on the remote are pushed first; the new one is pushed by
    the flow once its window is recorded (a failed push then leaves the window to resume on it).

    Returns:
        The new version (None when nothing new), the counts, and the window id (the given one, or
        ``seq-<after>-<high water>``).
    """
    cfg = workspace_config(versions.workspace, missing_ok=True)
    base = ensure_base(versions, cfg, url)
    after = feedback_after(base, url)
    events, high_water = monitoring.read_window(versions.workspace, cfg, after, url=url)
    name = window or f"seq-{after}-{high_water}"
    version, counts = append_version(versions, base, events, high_water, url, cfg, name, push=False)
    logger = get_run_logger()
    if version is None:
        logger.info("no new interactions after store seq %d (%s)", after, counts)
        return None, counts, name
    logger.info(
        "data version v%d: v%d + %d interactions from feedback seq %d..%d (%s)",
        version.version,
        base.version,
        version.n_appended,
        after + 1,
        high_water,
        counts,
    )
    return version.__dict__, counts, name


def _resume_registry(versions: DataVersions) -> None:
    """Set ``registry.enabled`` back to true where a retrain turned it off for its training run."""
    if versions.registry_paused:
        from components.pipeline import prepare_workspace

        prepare_workspace(versions.workspace, ["registry.enabled=true"])
        versions.registry_paused = False
        versions.save()


@flow(name="retrain", log_prints=True)
def retrain(
    workspace: str,
    window: str = "",
    reason: str = "",
    overrides: list[str] | None = None,
    feedback_url: str = "",
) -> dict[str, Any]:
    """Retrain on the feedback since the last data version; register, gate and maybe promote.

    Args:
        workspace: A workspace trained at least once (its registry and params exist).
        window: Idempotency key, e.g. the drift event's window; default ``seq-<after>-<high water>``.
        reason: Why (``drift: unseen_users``, ``schedule``); recorded with the window.
        overrides: ``-S`` overrides for this training run, after ``retrain.overrides``.
        feedback_url: Another feedback store than ``serve.feedback_url``.

    Returns:
        ``{window, reason, retrained, reused, data_version, n_appended, counts, training_run_id,
        metrics, registry: {version, promoted, champion, gate, reasons}}``.
    """
    from flows.training import register, training

    logger = get_run_logger()
    ws = str(Path(workspace).resolve())
    cfg = workspace_config(ws, missing_ok=True)
    url = monitoring.feedback_url(Path(ws), cfg, feedback_url or None)
    with DataVersions(Path(ws)).locked() as versions:
        _resume_registry(versions)
        record = versions.window(window) if window else None
        if record is not None and record.get("status") == "done":
            logger.info("window %s was already retrained: returning its result", window)
            return {**record["result"], "reused": True}
        if record is not None and record.get("status") == "training":
            # The same window was interrupted after its data version was made: train on that version.
            chosen = versions.versions[int(record["data_version"])]
            version: dict[str, Any] | None = chosen.__dict__
            counts: dict[str, int] = record.get("counts", {})
            name = window
            logger.info("window %s resumes on data version v%d", window, chosen.version)
        else:
            version, counts, name = snapshot_feedback(versions, url, window)
        if version is None:
            out: dict[str, Any] = {
                "window": name,
                "reason": reason,
                "retrained": False,
                "reused": False,
                "data_version": None,
                "counts": counts,
                "message": "no new feedback interactions since the last data version",
            }
            versions.set_window(name, status="done", result=out, reason=reason)
            versions.save()
            return out
        dv = DataVersion(**version)
        versions.set_window(name, status="training", data_version=dv.version, counts=counts, reason=reason)
        versions.save()
        # On the DVC remote before training: no model is trained on data another machine cannot pull.
        # A failed push fails the flow here; the window then resumes on this version and pushes again.
        for pushed in push_pending(versions, cfg.data.remote):
            logger.info("data version v%d pushed to DVC remote %s", pushed.version, pushed.remote)
        # The data version last: no other override may swap the data it is meant to train on.
        data_path = Path(ws) / dv.path
        train_overrides = [
            *cfg.retrain.overrides,
            *(overrides or []),
            f"data.path={data_path}",
            f"data.name={dv.name}",
        ]
        reevaluate = cfg.registry.enabled and cfg.retrain.reevaluate_champion
        if reevaluate:
            # This flow registers and gates itself (re-evaluating the champion on the new split);
            # the setting is restored right after (registry settings are no DVC stage's params), and
            # by the next retrain if this process dies first (the mark in versions.json).
            train_overrides.append("registry.enabled=false")
            versions.registry_paused = True
            versions.save()
        try:
            result = training(workspace=ws, overrides=train_overrides)
        finally:
            if reevaluate:
                _resume_registry(versions)
        if reevaluate and workspace_config(ws, missing_ok=True).model.name == "metarec":
            registry = register(ws, result["run_id"], reevaluate=True)
        else:
            registry = dict(result.get("registry") or {})
        registry.pop("decision", None)  # kept on the version as metarec.gate; the window records the rest
        out = {
            "window": name,
            "reason": reason,
            "retrained": True,
            "reused": False,
            "data_version": dv.version,
            "data_path": dv.path,
            "n_appended": dv.n_appended,
            "counts": counts,
            "training_run_id": result["run_id"],
            "metrics": {k: v for k, v in (result.get("metrics") or {}).items() if k in ("test", "cold")},
            "registry": registry,
        }
        versions.set_window(name, status="done", result=out, reason=reason)
        versions.save()
    verdict = "promoted to champion" if registry.get("promoted") else "kept as challenger"
    logger.info("window %s: version %s %s", name, registry.get("version"), verdict)
    return out
