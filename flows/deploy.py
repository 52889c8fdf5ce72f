"""Deployments of the monitor and retrain flows, served by ``metarec deploy`` (docs/operations.md).

* ``monitor/<deploy.name>``: the drift check on ``deploy.monitor_cron`` (hourly).
* ``retrain/<deploy.name>``: retraining on ``deploy.retrain_cron`` (nightly) and on every
  ``metarec.drift.detected`` event of this workspace, through a ``DeploymentEventTrigger`` whose
  parameters are templated from the event (``window``, the fired checks as ``reason``).

``serve_deployments`` runs both in this process (``prefect.serve``), so the machine serving them
executes the runs; docs/operations.md shows the work-pool form for a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.core.config import Config
from components.drift import reference as monitoring


def deployments(workspace: str | Path, cfg: Config) -> list[Any]:
    """The two ``RunnerDeployment`` objects for ``workspace``."""
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import EntrypointType
    from prefect.schedules import Cron

    from flows.monitor import monitor
    from flows.retrain import retrain

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
        entrypoint_type=EntrypointType.MODULE_PATH,
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
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return [monitor_dep, retrain_dep]


def serve_deployments(workspace: str | Path, cfg: Config, limit: int | None = None) -> None:
    """Create the deployments on the Prefect API and execute their runs until interrupted."""
    from prefect import serve

    serve(*deployments(workspace, cfg), pause_on_shutdown=False, limit=limit)
