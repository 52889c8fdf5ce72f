"""Deployments of the monitor and retrain flows, created by ``metarec deploy`` (docs/operations.md).

* ``monitor/<deploy.name>``: the drift check on ``deploy.monitor_cron`` (hourly).
* ``retrain/<deploy.name>``: retraining on ``deploy.retrain_cron`` (nightly) and on every
  ``metarec.drift.detected`` event of this workspace, through a ``DeploymentEventTrigger`` whose
  parameters are templated from the event (``window``, the fired checks as ``reason``).

Two ways to run them:

* ``serve_deployments`` (``deploy.work_pool`` null, the embedded profile): ``prefect.serve`` in this
  process, so the machine running ``metarec deploy`` executes the runs for as long as it runs.
* ``deploy_to_pool`` (``deploy.work_pool`` set, the production profile): the deployments are registered
  on a Prefect work pool of type ``process``, with their code read from this project's directory (no
  image is built), and a worker (``prefect worker start --pool <name>``) executes their runs; the
  command returns once they are registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from components.core.config import Config, ConfigError
from components.drift import reference as monitoring

#: The project directory: the code a worker runs the flows from (``flow.from_source``).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The flows' entrypoints, relative to the project directory.
ENTRYPOINTS = {"monitor": "flows/monitor.py:monitor", "retrain": "flows/retrain.py:retrain"}
#: The only work pool type the deployments are made for: flow runs in subprocesses of the worker.
POOL_TYPE = "process"


def _flows(source: str | Path | None) -> tuple[Any, Any, dict[str, Any]]:
    """The monitor and retrain flows, and how ``to_deployment`` must name their entrypoint.

    Without ``source``, the imported flows (served here, found by module path); with it, the flows
    loaded from that directory, which their deployments then carry as storage for a worker to pull.
    """
    if source is None:
        from prefect.flows import EntrypointType

        from flows.monitor import monitor
        from flows.retrain import retrain

        return monitor, retrain, {"entrypoint_type": EntrypointType.MODULE_PATH}
    from prefect import Flow

    root = str(Path(source).resolve())
    loaded: list[Any] = [
        Flow.from_source(source=root, entrypoint=ENTRYPOINTS[f]) for f in ("monitor", "retrain")
    ]
    return loaded[0], loaded[1], {}


def deployments(workspace: str | Path, cfg: Config, source: str | Path | None = None) -> list[Any]:
    """The two ``RunnerDeployment`` objects for ``workspace``.

    Args:
        workspace: The workspace the flows monitor and retrain.
        cfg: Its configuration (the ``deploy`` section).
        source: None to serve the imported flows in this process; a directory (the project) for
            deployments a worker runs from that directory.
    """
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    monitor, retrain, how = _flows(source)
    ws = str(Path(workspace).resolve())
    d = cfg.deploy
    tags = ["metarec", f"workspace:{Path(ws).name}"]
    resource = monitoring.workspace_resource(ws)
    monitor_dep = monitor.to_deployment(
        name=d.name,
        schedules=[Cron(d.monitor_cron, timezone=d.timezone)],
        parameters={"workspace": ws},
        description=f"Drift check of {ws}'s feedback against its champion's training data.",
        tags=tags,
        **how,
    )
    trigger = DeploymentEventTrigger(
        name=f"retrain {d.name} on drift",
        expect={monitoring.DRIFT_EVENT},
        match={"prefect.resource.id": resource["prefect.resource.id"]},
        parameters={
            "workspace": ws,
            "window": "{{ event.payload.window }}",
            "reason": "drift: {{ event.payload.fired_text }}",
        },
    )
    retrain_dep = retrain.to_deployment(
        name=d.name,
        schedules=[Cron(d.retrain_cron, timezone=d.timezone)],
        parameters={"workspace": ws, "reason": "schedule"},
        triggers=[trigger],
        description=f"Retrain {ws} on its feedback: new DVC data version, training, gate.",
        tags=tags,
        **how,
    )
    return [monitor_dep, retrain_dep]


def serve_deployments(workspace: str | Path, cfg: Config, limit: int | None = None) -> None:
    """Create the deployments on the Prefect API and execute their runs until interrupted."""
    from prefect import serve

    serve(*deployments(workspace, cfg), pause_on_shutdown=False, limit=limit)


def ensure_work_pool(pool: str) -> bool:
    """Make sure work pool ``pool`` exists and is of type ``process``; return whether it was created.

    Raises:
        ConfigError: A pool of that name exists with another type (its workers could not run these
            deployments from a directory).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type=POOL_TYPE, base_job_template=template))
                return True
            except ObjectAlreadyExists:  # created meanwhile by another `metarec deploy`
                found = client.read_work_pool(pool)
    if found.type != POOL_TYPE:
        raise ConfigError(
            f"deploy.work_pool {pool!r} is a work pool of type {found.type!r}; metarec's deployments run "
            f"from the project directory in a {POOL_TYPE!r} pool (`prefect work-pool create {pool}-process "
            f"--type {POOL_TYPE}`, then set deploy.work_pool to it)"
        )
    return False


def deploy_to_pool(
    workspace: str | Path,
    cfg: Config,
    pool: str | None = None,
    source: str | Path = PROJECT_ROOT,
) -> dict[str, UUID]:
    """Register the monitor and retrain deployments on a process work pool, for a worker to run.

    Their schedules, drift trigger and parameters are those :func:`serve_deployments` serves; their code
    is read from ``source`` (this project's directory, by default) where the worker runs, so the worker
    needs this project and its environment at the same path (a shared checkout, or the same image).

    Args:
        workspace: The workspace the flows monitor and retrain (an absolute path the worker can reach).
        cfg: Its configuration (the ``deploy`` section).
        pool: The work pool; None means ``deploy.work_pool``. Created (type ``process``) when missing.
        source: The project directory the worker loads the flows from.

    Returns:
        ``"<flow>/<deployment>"`` -> deployment id.

    Raises:
        ConfigError: No pool given or configured, or the pool is not a process pool.
    """
    pool = pool or cfg.deploy.work_pool
    if not pool:
        raise ConfigError("no work pool: set deploy.work_pool (or pass one) to deploy to a worker")
    ensure_work_pool(pool)
    ids: dict[str, UUID] = {}
    for dep in deployments(workspace, cfg, source=source):
        ids[f"{dep.flow_name}/{dep.name}"] = dep.apply(work_pool_name=pool)
    return ids
