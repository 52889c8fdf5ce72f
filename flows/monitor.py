"""The ``monitor`` flow: one drift check of the feedback since the champion's data, report, event.

1. The champion's reference comes from its own bundle (``registry.promotion.champion_bundle``,
   ``components.drift.reference``).
2. The window is the feedback store's events after the champion's data version (its high-water mark in
   ``data/feedback/versions.json``; the whole store when the champion predates retraining), cut by
   ``since_ts``/``until_ts`` when given.
3. Every check of ``components.drift`` runs; the HTML report, one PNG per check and the statistics
   as metrics go to an MLflow run in the ``<experiment>-monitor`` experiment. With
   ``METAREC_DRIFT_TEXTFILE_DIR`` set, the verdict also goes to a node_exporter textfile there, for the
   Prometheus drift alerts (``deploy/prometheus/alerts.yml``, docs/alerts.md).
4. On drift the flow emits ``metarec.drift.detected`` (payload: window, fired checks, every
   statistic). The ``retrain`` deployment's trigger (``flows/deploy.py``) starts retraining from it;
   ``deploy.trigger`` adds an explicit ``run_deployment`` or an inline subflow (docs/operations.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.core.config import Config
from components.core.workspace import workspace_config
from components.drift import reference as monitoring
from components.drift import report
from registry import promotion


@task(name="load-reference", cache_policy=NO_CACHE)
def load_reference(workspace: str, cfg: Config) -> monitoring.ReferenceData:
    """Download the champion's bundle (cached per version) and summarise its training data."""
    version, bundle = promotion.champion_bundle(Path(workspace), cfg)
    return monitoring.reference_from_bundle(bundle, cfg, version)


# Reading the store is idempotent: a transient store error deserves another try.
read_feedback = task(name="read-feedback", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)(
    monitoring.read_window
)


@task(name="drift-report", cache_policy=NO_CACHE)
def drift_report(
    workspace: Path,
    cfg: Config,
    ref: monitoring.ReferenceData,
    events: pd.DataFrame,
    window: str,
    step: int | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Check and report the window to MLflow, then publish the verdict for Prometheus (docs/alerts.md)."""
    checked = monitoring.report_window(workspace, cfg, ref, events, window, step, tags)
    try:
        written = report.write_textfile(checked["payload"])
    except OSError as err:
        # The check and its report stand; the stale-check alert notices the file going old.
        get_run_logger().warning("could not write the drift textfile: %s", err)
    else:
        if written is not None:
            get_run_logger().info("drift verdict written to %s", written)
    return checked


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift_event(workspace: str, payload: dict[str, Any]) -> str | None:
    """Emit ``metarec.drift.detected`` for the workspace; return the event id (None when not sent)."""
    from prefect.events import emit_event

    champion = payload.get("champion")
    model = {"prefect.resource.id": f"metarec.model-version.{champion}", "prefect.resource.role": "champion"}
    event = emit_event(
        event=monitoring.DRIFT_EVENT,
        resource=monitoring.workspace_resource(workspace),
        related=[] if champion is None else [model],
        payload=payload,
    )
    return str(event.id) if event is not None else None


@task(name="start-retrain-deployment", cache_policy=NO_CACHE)
def start_retrain_deployment(deployment: str, parameters: dict[str, Any]) -> str:
    """The fallback for servers without automations: create a run of the retrain deployment."""
    from prefect.deployments import run_deployment

    run: Any = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
    return str(run.id)


@flow(name="monitor", log_prints=True)
def monitor(
    workspace: str,
    window: str = "",
    since_ts: float | None = None,
    until_ts: float | None = None,
    after_seq: int | None = None,
    feedback_url: str = "",
    trigger: str = "",
    step: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """One drift check now: report to MLflow, and on drift the event (and ``trigger``'s follow-up).

    Args:
        workspace: The workspace whose champion and feedback store are checked.
        window: Name of the window (the retrain idempotency key); default ``seq-<after>-<last>``.
        since_ts, until_ts: Event-time bounds (epoch seconds) of the window, inclusive.
        after_seq: Store sequence to read after; default the champion's data high-water mark.
        feedback_url: Another feedback store than ``serve.feedback_url``.
        trigger: ``event``, ``run_deployment``, ``inline`` or ``none``; default ``deploy.trigger``.
        step: MLflow metric step (the window index in a replay).
        overrides: ``-S`` overrides of the workspace config for this check only.

    Returns:
        ``{window, drifted, fired, statistics, n_events, champion, mlflow_run_id, event_id,
        triggered}``.
    """
    logger = get_run_logger()
    ws = str(Path(workspace).resolve())
    overrides = list(overrides or [])
    cfg = workspace_config(ws, overrides, missing_ok=True)
    mode = trigger or cfg.deploy.trigger
    if mode not in ("event", "run_deployment", "inline", "none"):
        raise ValueError(f"trigger must be event, run_deployment, inline or none, got {mode!r}")
    ref = load_reference(ws, cfg)
    url = monitoring.feedback_url(Path(ws), cfg, feedback_url or None)
    start = monitoring.champion_high_water(Path(ws), ref, url) if after_seq is None else int(after_seq)
    events, last = read_feedback(Path(ws), cfg, start, since_ts, until_ts, url)
    name = window or f"seq-{start}-{last}"
    checked = drift_report(Path(ws), cfg, ref, events, name, step, {"metarec.trigger": mode})
    payload = checked["payload"]
    out: dict[str, Any] = {
        "window": name,
        "drifted": checked["drifted"],
        "fired": payload["fired"],
        "statistics": payload["statistics"],
        "metrics": payload["metrics"],
        "n_events": payload["n_events"],
        "champion": ref.version,
        "mlflow_run_id": payload["mlflow_run_id"],
        "after_seq": start,
        "high_water": last,
        "event_id": None,
        "triggered": None,
    }
    if not checked["drifted"]:
        logger.info("window %s: no drift over %d events (champion v%s)", name, len(events), ref.version)
        return out
    logger.info("window %s: DRIFT in %s (champion v%s)", name, ", ".join(payload["fired"]), ref.version)
    if mode == "none":
        return out
    out["event_id"] = emit_drift_event(ws, payload)
    params = monitoring.retrain_parameters(ws, payload)
    if mode == "run_deployment":
        deployment = f"retrain/{cfg.deploy.name}"
        out["triggered"] = {"mode": mode, "deployment": deployment, "flow_run_id": "pending"}
        out["triggered"]["flow_run_id"] = start_retrain_deployment(deployment, params)
    elif mode == "inline":
        from flows.retrain import retrain

        out["triggered"] = {"mode": mode, "result": retrain(**params)}
    else:
        out["triggered"] = {"mode": mode, "event": monitoring.DRIFT_EVENT}
    return out
