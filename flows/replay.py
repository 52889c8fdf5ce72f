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

import secrets
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import replay as rp
from components.retrain import FEEDBACK_DATA
from registry.store import CHAMPION, open_registry

prepare = task(name="prepare-replay", cache_policy=NO_CACHE)(rp.prepare)
play_window = task(name="play-window", task_run_name="{arm}-w{window}", cache_policy=NO_CACHE)(
    rp.ReplayClient.play
)
wait_for_retrain = task(name="wait-for-retrain", cache_policy=NO_CACHE)(rp.wait_for_window)
report = task(name="report-replay", cache_policy=NO_CACHE)(rp.report)


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

    logger = get_run_logger()
    ws = Path(workspace).resolve()
    arms = list(arms or rp.ARMS)
    if set(arms) - set(rp.ARMS):
        raise ValueError(f"arms must be among {rp.ARMS}, got {arms}")
    if trigger not in ("inline", "event", "run_deployment"):
        raise ValueError(f"trigger must be inline, event or run_deployment, got {trigger!r}")
    if (ws / FEEDBACK_DATA / "versions.json").exists():
        raise ValueError(f"{ws} already holds data versions; a replay starts from a new workspace")
    overrides = ["model.name=metarec", "serve.poll_seconds=1", *(overrides or [])]
    plan, cfg = prepare(ws, windows, train_fraction, replay_fraction, overrides)
    name = cfg.data.name
    logger.info("cut: %d interactions in v0, %d windows of %d", len(plan.base), windows, len(plan.windows[0]))
    # v0 last: an override naming the source dataset (data.path) must not train on all of it.
    first = training(
        workspace=str(ws),
        overrides=[*overrides, f"data.path={ws / FEEDBACK_DATA / 'v0'}", f"data.name={name}"],
    )
    if open_registry(ws).aliases().get(CHAMPION) is None:
        reasons = (first.get("registry") or {}).get("reasons", [])
        raise RuntimeError("the first model did not pass the gate's floors:\n" + "\n".join(reasons))
    profiles = rp.read_profiles(ws / "data" / "replay" / "source" / f"{name}.user")
    api_key = secrets.token_hex(16)
    out_dir = ws / "replay"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        url, mode = rp.arm_store(ws, cfg, arm, trigger)
        rows: list[dict[str, Any]] = []
        with rp.running_server(ws, url, api_key, out_dir / f"serve-{arm}.log") as server:
            client = rp.ReplayClient(server.url, api_key, profiles, k)
            try:
                for w, frame in enumerate(plan.windows):
                    window, last = f"{arm}-w{w}", w + 1 == len(plan.windows)
                    serving = server.serving()
                    stats = play_window(client, w, frame, arm)
                    checked = monitor(
                        workspace=str(ws),
                        window=window,
                        since_ts=float(frame["timestamp"].min()),
                        until_ts=float(frame["timestamp"].max()),
                        feedback_url=url,
                        trigger="none" if last and not retrain_last else mode,
                        step=w,
                    )
                    row = rp.window_row(w, serving, stats, checked)
                    if checked["drifted"] and mode != "none" and (retrain_last or not last):
                        if mode == "inline":
                            result = checked["triggered"]["result"]
                        else:
                            result = wait_for_retrain(ws, window, retrain_timeout)
                        row["retrain"] = result
                        reg = result.get("registry") or {}
                        if reg.get("promoted") and not last:
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
    return report(ws, cfg, params, plan, results)
