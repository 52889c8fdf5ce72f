"""The ``replay`` flow: a temporal replay of a dataset through the real serving API (docs/operations.md).

1. Cut the dataset by global time (``components.replay.temporal_cut``); the first part becomes data
   version ``v0`` and the first model is trained on it (the ``training`` flow, registered and gated).
2. Arm ``static``: ``metarec serve`` on that champion with its own feedback store; every window is
   played through the API and checked by the ``monitor`` flow, which only reports.
3. Arm ``retrain``: the same windows against the workspace's own feedback store; the monitor runs
   per window, drift triggers the ``retrain`` flow (inline, or the deployment via the drift event),
   the gate decides, and the server hot-swaps to a promoted champion before the next window.
4. Both arms' per-window statistics go to MLflow (experiment ``<experiment>-replay``: one run per
   arm with per-window metrics, and a parent run with the comparison plot and ``replay.json``).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from components import replay as rp
from components.drift import reference as monitoring
from components.retrain import FEEDBACK_DATA, DataVersions, register_base

ARMS = ("static", "retrain")
STATIC_STORE = "feedback/replay-static.db"


def _prepare(
    ws: Path, windows: int, train_fraction: float, replay_fraction: float, overrides: list[str]
) -> tuple[rp.ReplayPlan, Any]:
    """Fetch the dataset, cut it, write and ``dvc add`` v0, and return the plan and config."""
    from components import pipeline
    from components.data import fetch

    cfg = pipeline.prepare_workspace(ws, overrides)
    name = cfg.data.name
    source = ws / "data" / "replay" / "source"
    if not fetch.dataset_files(source, name):
        fetch.fetch(source, cfg.data.path, name)
    header, frame = rp.read_interactions(source / f"{name}.inter")
    plan = rp.temporal_cut(header, frame, train_fraction, windows, replay_fraction)
    rel = FEEDBACK_DATA / "v0"
    dest = ws / rel
    dest.mkdir(parents=True, exist_ok=True)
    for path in fetch.dataset_files(source, name):
        if path.name != f"{name}.inter":
            shutil.copyfile(path, dest / path.name)
    rp.write_inter(dest / f"{name}.inter", header, plan.base)
    url = monitoring.feedback_url(ws, cfg)
    with DataVersions(ws).locked() as versions:
        register_base(
            versions, rel, name, url, f"replay: first {train_fraction:.0%} of {name} by global time"
        )
    return plan, cfg


def _wait_for_window(ws: Path, window: str, timeout: float) -> dict[str, Any]:
    """Wait until the retrain flow recorded ``window`` as done (event-triggered retraining)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        record = DataVersions(ws).window(window)
        if record is not None and record.get("status") == "done":
            return dict(record["result"])
        time.sleep(2)
    raise TimeoutError(f"no retrain run finished window {window} within {timeout:.0f}s")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _log(ws: Path, cfg: Any, params: dict[str, Any], arms: dict[str, list[dict[str, Any]]], out: Path) -> str:
    """One MLflow run per arm (per-window metrics) under a parent run with the plot and summary."""
    import mlflow

    from components.core import tracking

    experiment_id = tracking.setup(ws, cfg.tracking.experiment + "-replay", cfg.tracking.uri)
    plot = rp.plot_replay(arms, out / "replay.png")
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="replay", tags={"metarec.flow": "replay"}
    ) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for arm, rows in arms.items():
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"replay {arm}", nested=True, tags={"metarec.arm": arm}
            ):
                for r in rows:
                    step = int(r["window"])
                    client = r["client"]
                    metrics = {
                        "online_hit_at_10": client["hit_rate"],
                        "online_ctr": client["ctr"],
                        "lists": client["lists"],
                        "cold_requests": client["cold_requests"],
                        "model_version": float(r["serving_version"]),
                        "retrained": float(bool(r.get("retrain"))),
                        "promoted": float(bool((r.get("retrain") or {}).get("registry", {}).get("promoted"))),
                    }
                    metrics.update((r.get("drift") or {}).get("metrics", {}))
                    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _finite(v)}, step=step)
                summary = _summary(rows)
                mlflow.log_metrics({k: v for k, v in summary.items() if _finite(v)})
        for arm, rows in arms.items():
            mlflow.log_metrics({f"{arm}.{k}": v for k, v in _summary(rows).items() if _finite(v)})
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out / "replay.json"))
        mlflow.log_artifact(str(out / "replay.md"))
        return str(parent.info.run_id)


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    lists = sum(r["client"]["lists"] for r in rows)
    hits = sum(r["client"]["hits"] for r in rows)
    later = [r for r in rows if r["window"] > 0]
    later_lists = sum(r["client"]["lists"] for r in later)
    return {
        "hit_rate_all": hits / lists if lists else float("nan"),
        "hit_rate_after_first": (sum(r["client"]["hits"] for r in later) / later_lists)
        if later_lists
        else float("nan"),
        "windows_drifted": float(sum(bool((r.get("drift") or {}).get("drifted")) for r in rows)),
        "retrains": float(sum(bool(r.get("retrain")) for r in rows)),
        "promotions": float(
            sum(bool((r.get("retrain") or {}).get("registry", {}).get("promoted")) for r in rows)
        ),
    }


def _markdown(
    params: dict[str, Any], plan: list[dict[str, Any]], arms: dict[str, list[dict[str, Any]]]
) -> str:
    lines = ["# Replay", "", "```", json.dumps(params, indent=1, default=str), "```", ""]
    lines += ["| window | rows | users | users new to v0 |", "|---|---|---|---|"]
    lines += [f"| {p['window']} | {p['rows']} | {p['users']} | {p['users_new_to_base']} |" for p in plan]
    lines += ["", "| arm | window | served by | lists | online hit@10 | CTR | drift fired | retrain → gate |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for arm, rows in arms.items():
        for r in rows:
            fired = ", ".join((r.get("drift") or {}).get("fired", [])) or "—"
            rt = r.get("retrain")
            if rt:
                reg = rt.get("registry", {})
                gate = f"v{reg.get('version')} {'promoted' if reg.get('promoted') else 'refused'}"
            else:
                gate = "—"
            c = r["client"]
            lines.append(
                f"| {arm} | {r['window']} | v{r['serving_version']} | {c['lists']} | {c['hit_rate']:.4f} | "
                f"{c['ctr']:.4f} | {fired} | {gate} |"
            )
    lines += ["", "| arm | hit@10 all windows | hit@10 after window 0 | retrains | promotions |"]
    lines += ["|---|---|---|---|---|"]
    for arm, rows in arms.items():
        s = _summary(rows)
        lines.append(
            f"| {arm} | {s['hit_rate_all']:.4f} | {s['hit_rate_after_first']:.4f} | {s['retrains']:.0f} | "
            f"{s['promotions']:.0f} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="replay", log_prints=True)
def replay(
    workspace: str,
    windows: int = 4,
    train_fraction: float = 0.5,
    replay_fraction: float = 1.0,
    overrides: list[str] | None = None,
    arms: list[str] | None = None,
    trigger: str = "inline",
    k: int = 10,
    retrain_timeout: float = 3600.0,
    retrain_last: bool = False,
) -> dict[str, Any]:
    """Replay a dataset's later interactions window by window through ``metarec serve``.

    Args:
        workspace: A new workspace directory (the replay trains its own first model there).
        windows: Number of replayed windows.
        train_fraction: Share of interactions (by global time) the first model is trained on.
        replay_fraction: Share of the remaining interactions replayed (cut into ``windows``).
        overrides: ``-S`` overrides for every training run of the replay (first and retrains).
        arms: Which arms to run, in this order: ``static`` (no retraining) and/or ``retrain``.
        trigger: How drift starts retraining in the retrain arm: ``inline`` (subflow of the monitor),
            ``event`` (the retrain deployment's trigger; needs ``metarec deploy`` on the same Prefect
            server) or ``run_deployment``.
        k: List length.
        retrain_timeout: Seconds to wait for an event-triggered retrain.
        retrain_last: Also retrain after the last window (no replayed window can show its effect, so
            by default the last window's monitor only reports).

    Returns:
        The plan, per-arm per-window results, summaries and the MLflow run id.
    """
    from flows.monitor import monitor
    from flows.training import training
    from registry.store import CHAMPION, open_registry

    logger = get_run_logger()
    ws = Path(workspace).resolve()
    arms = list(arms or ARMS)
    if set(arms) - set(ARMS):
        raise ValueError(f"arms must be among {ARMS}, got {arms}")
    if trigger not in ("inline", "event", "run_deployment"):
        raise ValueError(f"trigger must be inline, event or run_deployment, got {trigger!r}")
    if (ws / FEEDBACK_DATA / "versions.json").exists():
        raise ValueError(f"{ws} already holds data versions; a replay starts from a new workspace")
    overrides = ["model.name=metarec", "serve.poll_seconds=1", *(overrides or [])]
    plan, cfg = _prepare(ws, windows, train_fraction, replay_fraction, overrides)
    name = cfg.data.name
    logger.info("cut: %d interactions in v0, %d windows of %d", len(plan.base), windows, len(plan.windows[0]))
    # v0 last: an override naming the source dataset (data.path) must not train on all of it.
    first = training(
        workspace=str(ws),
        overrides=[*overrides, f"data.path={ws / FEEDBACK_DATA / 'v0'}", f"data.name={name}"],
    )
    registry = open_registry(ws)
    champion = registry.aliases().get(CHAMPION)
    if champion is None:
        reasons = (first.get("registry") or {}).get("reasons", [])
        raise RuntimeError("the first model did not pass the gate's floors:\n" + "\n".join(reasons))
    profiles = rp.read_profiles(ws / "data" / "replay" / "source" / f"{name}.user")
    api_key = secrets.token_hex(16)
    out_dir = ws / "replay"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        if arm == "static":
            url = f"sqlite:///{ws / STATIC_STORE}"
            mode = "none"
        else:
            url = monitoring.feedback_url(ws, cfg)
            mode = trigger
        rows: list[dict[str, Any]] = []
        with rp.running_server(ws, url, api_key, out_dir / f"serve-{arm}.log") as server:
            client = rp.ReplayClient(server.url, api_key, profiles, k)
            try:
                for w, frame in enumerate(plan.windows):
                    serving = server.serving()
                    stats = client.play(w, frame, arm)
                    window = f"{arm}-w{w}"
                    last = w + 1 == len(plan.windows)
                    checked = monitor(
                        workspace=str(ws),
                        window=window,
                        since_ts=float(frame["timestamp"].min()),
                        until_ts=float(frame["timestamp"].max()),
                        feedback_url=url,
                        trigger="none" if last and not retrain_last else mode,
                        step=w,
                    )
                    row: dict[str, Any] = {
                        "window": w,
                        "serving_version": serving,
                        "client": stats.to_dict(),
                        "drift": {
                            k_: checked[k_]
                            for k_ in ("drifted", "fired", "statistics", "metrics", "champion")
                        },
                        "monitor_run_id": checked["mlflow_run_id"],
                        "retrain": None,
                    }
                    if checked["drifted"] and mode != "none" and (retrain_last or not last):
                        if mode == "inline":
                            result = checked["triggered"]["result"]
                        else:
                            result = _wait_for_window(ws, window, retrain_timeout)
                        row["retrain"] = result
                        reg = result.get("registry") or {}
                        if reg.get("promoted") and w + 1 < len(plan.windows):
                            row["swap_seconds"] = server.wait_for_version(str(reg["champion"]))
                    logger.info(
                        "%s w%d: served by v%s, hit@10 %.4f over %d lists, drift %s%s",
                        arm,
                        w,
                        serving,
                        stats.hit_rate,
                        stats.lists,
                        ",".join(checked["fired"]) or "none",
                        "" if not row["retrain"] else f", retrain -> {row['retrain'].get('registry')}",
                    )
                    rows.append(row)
            finally:
                client.close()
        results[arm] = rows
    params = {
        "dataset": name,
        "windows": windows,
        "train_fraction": train_fraction,
        "replay_fraction": replay_fraction,
        "overrides": overrides,
        "trigger": trigger,
        "k": k,
        "retrain_last": retrain_last,
    }
    summaries = {arm: _summary(rows) for arm, rows in results.items()}
    payload = {"params": params, "plan": plan.summary(), "arms": results, "summary": summaries}
    (out_dir / "replay.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    (out_dir / "replay.md").write_text(_markdown(params, plan.summary(), results), encoding="utf-8")
    run_id = _log(ws, cfg, params, results, out_dir)
    return {**payload, "mlflow_run_id": run_id, "report": str(out_dir / "replay.md")}
