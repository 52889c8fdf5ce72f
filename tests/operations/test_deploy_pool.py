"""Worker-served deployments: monitor and retrain registered on a process work pool of the session's
Prefect server, with the schedules, drift trigger and parameters ``metarec deploy`` serves in-process,
and their code pulled from the project directory (no image). No worker runs them here."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from components.core.config import Config, ConfigError, DeployConfig
from components.drift import reference as monitoring
from flows.deploy import ENTRYPOINTS, PROJECT_ROOT, deploy_to_pool, ensure_work_pool

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_deploy_to_a_process_pool(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger

    ws = tmp_path / "ws"
    ws.mkdir()
    suffix = uuid.uuid4().hex[:8]
    pool = f"metarec-pool-{suffix}"
    cfg = Config(deploy=DeployConfig(name=f"pooled-{suffix}", work_pool=pool, monitor_cron="*/30 * * * *"))

    ids = deploy_to_pool(ws, cfg)  # creates the missing pool
    assert set(ids) == {f"monitor/pooled-{suffix}", f"retrain/pooled-{suffix}"}
    assert deploy_to_pool(ws, cfg) == ids  # idempotent: the same deployments, updated

    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        monitor = client.read_deployment(ids[f"monitor/pooled-{suffix}"])
        retrain = client.read_deployment(ids[f"retrain/pooled-{suffix}"])
        automations = client.read_resource_related_automations(f"prefect.deployment.{retrain.id}")
        assert not client.read_resource_related_automations(f"prefect.deployment.{monitor.id}")
        # A pool of another type is refused, not deployed to.
        other = f"metarec-other-{suffix}"
        client.create_work_pool(WorkPoolCreate(name=other, type="prefect-agent", base_job_template={}))
    ws_abs = str(ws.resolve())
    for dep, flow in ((monitor, "monitor"), (retrain, "retrain")):
        assert dep.work_pool_name == pool
        assert dep.entrypoint == ENTRYPOINTS[flow]
        # The worker runs the flow from the project directory: the deployment's only pull step.
        assert dep.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
        ]
        assert "metarec" in dep.tags
    for dep, cron in ((monitor, "*/30 * * * *"), (retrain, "0 3 * * *")):
        (schedule,) = (s.schedule for s in dep.schedules)
        assert isinstance(schedule, CronSchedule) and (schedule.cron, schedule.timezone) == (cron, "UTC")
    assert monitor.parameters == {"workspace": ws_abs}
    assert retrain.parameters == {"workspace": ws_abs, "reason": "schedule"}

    # The drift trigger: one automation, on this workspace's drift event, starting this deployment.
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert isinstance(trigger, EventTrigger) and trigger.expect == {monitoring.DRIFT_EVENT}
    match: Any = trigger.match
    assert (
        match.model_dump()["prefect.resource.id"] == monitoring.workspace_resource(ws)["prefect.resource.id"]
    )
    (action,) = automations[0].actions
    assert isinstance(action, RunDeployment) and action.deployment_id == retrain.id
    assert (action.parameters or {})["window"] == "{{ event.payload.window }}"

    with pytest.raises(ConfigError, match="of type 'prefect-agent'"):
        ensure_work_pool(other)
    with pytest.raises(ConfigError, match="no work pool"):
        deploy_to_pool(ws, Config())
