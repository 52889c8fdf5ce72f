"""The DVC remote: every data version retraining makes is pushed, and a second machine pulls it back.

A real directory remote under ``tmp_path`` and the committed tiny dataset: ``v0`` and ``v1`` are made
as the retrain flow makes them, a push that fails is recorded as not pushed and pushed by the next
call, and a "second machine" (another directory holding only the workspace's DVC files, with an empty
cache) runs ``dvc pull`` and gets the same bytes. No model is trained.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import retrain
from components.core.config import ConfigError, load_config
from components.data import fetch
from components.pipeline import (
    PROJECT_ROOT,
    REMOTE_NAME,
    PipelineError,
    configured_remote,
    prepare_workspace,
)
from components.retrain import DataPushError, DataVersions, append_version, ensure_base, push_pending

FEEDBACK_URL = "sqlite:///feedback/feedback.db"
# What a second machine needs to pull the data versions (docs/production.md, "DVC remote").
DVC_FILES = [".dvc/config", "dvc.yaml", "params.yaml", "data/feedback/versions.json"]


def _events(*rows: tuple[str, str, str, str, float, float | None]) -> pd.DataFrame:
    columns = ["event_id", "type", "user_id", "item_id", "ts", "value"]
    return pd.DataFrame(list(rows), columns=columns)


def _remote_object(remote: Path, md5: str) -> Path:
    """Where a DVC 3 remote (like the cache) keeps the object with hash ``md5``."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=retrain._dvc_env()
    )


def test_versions_are_pushed_and_a_second_machine_pulls_them(
    tmp_path: Path, tiny_dir: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(retrain, "PUSH_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(retrain, "PUSH_ATTEMPTS", 2)  # a retry, then the error
    remote = tmp_path / "remote"
    ws = tmp_path / "ws"
    # A relative directory is resolved against the current directory and stored absolute.
    cfg = prepare_workspace(ws, [*tiny_overrides, "data.remote=remote"])
    assert cfg.data.remote == str(remote)
    assert load_config(ws / "params.yaml").data.remote == str(remote)
    assert configured_remote(ws) == str(remote)
    config_text = (ws / ".dvc" / "config").read_text(encoding="utf-8")
    prepare_workspace(ws, ["seed=42"])  # idempotent: the remote stays, configured once
    assert (ws / ".dvc" / "config").read_text(encoding="utf-8") == config_text

    # The remote cannot be written (a file where its directory should be): v0 is recorded, not pushed,
    # and the error names the remote.
    remote.write_text("not a directory", encoding="utf-8")
    with DataVersions(ws).locked() as versions, pytest.raises(DataPushError, match=REMOTE_NAME) as failed:
        ensure_base(versions, cfg, FEEDBACK_URL)
    assert str(remote) in str(failed.value)
    (v0,) = DataVersions(ws).versions
    assert (v0.version, v0.pushed, v0.remote, v0.pushed_at) == (0, False, "", "")

    # Once the remote works, the next retrain's ensure_base pushes it; then v1 is pushed when made.
    remote.unlink()
    events = _events(
        ("r1", "rating", "u1", "i8", 2000.0, 5.0),
        ("c1", "click", "u4", "i8", 2001.0, None),
    )
    with DataVersions(ws).locked() as versions:
        base = ensure_base(versions, cfg, FEEDBACK_URL)
        assert (base.version, base.pushed, base.remote) == (0, True, str(remote))
        v1, _ = append_version(versions, base, events, 2, FEEDBACK_URL, cfg, "w1")
        assert v1 is not None and (v1.version, v1.pushed, v1.remote) == (1, True, str(remote))
        assert push_pending(versions, cfg.data.remote) == []  # nothing left: no second push
    recorded = json.loads((ws / "data" / "feedback" / "versions.json").read_text(encoding="utf-8"))
    assert [(v["pushed"], v["remote"], bool(v["pushed_at"])) for v in recorded["versions"]] == [
        (True, str(remote), True)
    ] * 2

    # In the remote, in DVC's content-addressed layout: each version's directory object and every
    # file it lists.
    for version in (base, v1):
        tree_object = _remote_object(remote, version.dvc_md5)
        assert tree_object.is_file(), version
        entries = json.loads(tree_object.read_text(encoding="utf-8"))
        assert {e["relpath"] for e in entries} == {p.name for p in (ws / version.path).iterdir()}
        for entry in entries:
            assert _remote_object(remote, entry["md5"]).is_file(), entry

    # A second machine: the workspace's DVC files only, an empty cache, the same remote.
    ws2 = tmp_path / "machine2" / "ws"
    for rel in [*DVC_FILES, *(str(p.relative_to(ws)) for p in (ws / "data" / "feedback").glob("*.dvc"))]:
        (ws2 / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ws / rel, ws2 / rel)
    assert not (ws2 / ".dvc" / "cache").exists() and not (ws2 / base.path).exists()
    pulled = _dvc(ws2, "pull", "-R", "data/feedback")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    for version in (base, v1):
        assert _files(ws2 / version.path) == _files(ws / version.path)
        # Same bytes, same data.fingerprint: the fetch stage of a run on v1 there has the same params.
        assert fetch.fingerprint(str(ws2 / version.path), "tiny") == fetch.fingerprint(
            str(ws / version.path), "tiny"
        )
    assert _files(ws2 / base.path)["tiny.inter"] == (tiny_dir / "tiny.inter").read_bytes()
    # v0 is the data the workspace's first run trained on: a run on the pulled v0 has that run's params.
    assert fetch.fingerprint(str(ws2 / base.path), "tiny") == fetch.fingerprint(str(tiny_dir), "tiny")


def test_remote_setting_is_checked_and_no_stage_depends_on_it(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # Credentials never go into params.yaml.
    with pytest.raises(ConfigError, match=r"data\.remote holds a password") as refused:
        load_config(PROJECT_ROOT / "params.yaml", ["data.remote=ssh://deploy:hunter2@host/dvc"])
    assert "hunter2" not in str(refused.value)
    # No stage lists the setting, so setting or changing it reruns nothing.
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in stages.items():
        assert not {"data", "data.remote"} & set(stage.get("params", [])), name

    ws = tmp_path / "ws"
    cfg = prepare_workspace(ws, [*tiny_overrides, f"data.remote={tmp_path / 'remote'}"])
    assert configured_remote(ws) == cfg.data.remote == str(tmp_path / "remote")
    # Unset again: the workspace's remote goes with it.
    prepare_workspace(ws, ["data.remote=null"])
    assert configured_remote(ws) is None and "metarec" not in (ws / ".dvc" / "config").read_text()
    with DataVersions(ws).locked() as versions:
        assert push_pending(versions, None) == []
    # An S3 remote needs DVC's S3 plugin; without it the workspace is refused before a push would fail.
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        with pytest.raises(PipelineError, match=r"dvc\[s3\]"):
            prepare_workspace(ws, ["data.remote=s3://bucket/metarec"])
        assert configured_remote(ws) is None


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_flow_pushes_before_training_and_a_failed_push_resumes(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow pushes the new version once its window is recorded, before any training; a failed push
    fails the flow, and the same window rerun pushes that version and trains on it (training stubbed)."""
    import flows.training
    from components.drift import reference as monitoring
    from components.serving.feedback import FeedbackEvent
    from flows.retrain import retrain as retrain_flow

    monkeypatch.setattr(retrain, "PUSH_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(retrain, "PUSH_ATTEMPTS", 1)
    trained: list[list[str]] = []

    def fake_training(workspace: str, overrides: list[str]) -> dict[str, object]:
        trained.append(overrides)
        return {"run_id": "run-1", "metrics": {}}

    monkeypatch.setattr(flows.training, "training", fake_training)
    remote = tmp_path / "remote"
    ws = tmp_path / "ws"
    cfg = prepare_workspace(ws, [*tiny_overrides, f"data.remote={remote}", "registry.enabled=false"])
    store = monitoring.open_feedback(ws, cfg)
    store.write([FeedbackEvent("r1", "rating", "u1", "i8", 2000.0, value=5.0)])
    store.close()
    with DataVersions(ws).locked() as versions:
        ensure_base(versions, cfg, monitoring.feedback_url(ws, cfg))  # v0, pushed

    remote.rename(tmp_path / "remote-away")
    remote.write_text("not a directory", encoding="utf-8")
    with pytest.raises(DataPushError, match=REMOTE_NAME):
        retrain_flow(workspace=str(ws), window="w1")
    assert trained == []  # never trained on data the remote does not have
    state = DataVersions(ws)
    record = state.window("w1")
    assert record is not None and (record["status"], record["data_version"]) == ("training", 1)
    assert [(v.version, v.pushed) for v in state.versions] == [(0, True), (1, False)]

    remote.unlink()
    (tmp_path / "remote-away").rename(remote)
    out = retrain_flow(workspace=str(ws), window="w1")
    assert out["retrained"] is True and out["data_version"] == 1
    assert [(v.version, v.pushed, v.remote) for v in DataVersions(ws).versions] == [
        (0, True, str(remote)),
        (1, True, str(remote)),
    ]
    assert len(trained) == 1 and f"data.path={ws / 'data' / 'feedback' / 'v1'}" in trained[0]
    assert _remote_object(remote, DataVersions(ws).versions[1].dvc_md5).is_file()
