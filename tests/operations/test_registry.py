"""The model registry: bundle manifests, the promotion gate, and audited alias moves on a real MLflow store.

One module-scoped workspace holds the sqlite store and a few logged bundles (logging is the slow part);
each test registers them into its own registered model, so tests do not see each other's aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from components.bundle.format import MANIFEST, BundleError, verify_bundle, write_manifest
from components.core.config import Config, RegistryConfig
from metarec.cli import app
from registry.gate import Candidate, Reevaluation, eval_fingerprint, evaluate_gate
from registry.promotion import gate, register_and_gate
from registry.store import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    LAST_MOVE,
    LoggedBundle,
    Registry,
    RegistryError,
    champion_history,
    open_registry,
)

METAREC = Path(sys.executable).parent / "metarec"
DATA = {"data/split": "split-md5-1", "data/processed": "proc-md5-1"}
runner = CliRunner()


def metrics(
    ndcg: float, cold: float, cosine: float = 0.999, rel_diff: float = 0.001, p99: float = 10.0
) -> dict[str, dict[str, float]]:
    """Bundle metrics in the export stage's layout."""
    return {
        "warm": {"ndcg@10": ndcg, "recall@10": ndcg * 1.5},
        "cold": {"recall@20": cold},
        "parity": {"max_abs_diff": 1e-5, "int8_mean_cosine": cosine, "ndcg_rel_diff": rel_diff},
        "latency": {"scorer_p99_ms": p99},
    }


def make_bundle(directory: Path, data: dict[str, str] = DATA, **kw: float) -> Path:
    """A small bundle: a few random-bytes files and a correct ``bundle.json``."""
    directory.mkdir(parents=True)
    (directory / "encoder.onnx").write_bytes(os.urandom(256))
    (directory / "scorer.onnx").write_bytes(os.urandom(128))
    (directory / "tables").mkdir()
    (directory / "tables" / "items.parquet").write_bytes(os.urandom(64))
    write_manifest(
        directory,
        metrics=metrics(**kw),
        config={"seed": 42},
        data_version=data,
        git_commit="0123abcd",
        model_card=f"# metarec bundle\n\nwarm ndcg@10 {kw['ndcg']}",
    )
    return directory


# Named bundles: A good, B better, C best, W worse than A, F below the absolute floors.
BUNDLES: dict[str, dict[str, float]] = {
    "A": {"ndcg": 0.30, "cold": 0.30},
    "B": {"ndcg": 0.32, "cold": 0.30},
    "C": {"ndcg": 0.35, "cold": 0.31, "p99": 11.0},
    "W": {"ndcg": 0.28, "cold": 0.30},
    "F": {"ndcg": 0.03, "cold": 0.30},
}
PASSING_AFTER_A = {"B", "C"}


class Store:
    """The shared workspace, its bundle directories and their logged models."""

    def __init__(self, ws: Path, dirs: dict[str, Path], logged: dict[str, LoggedBundle]) -> None:
        self.ws = ws
        self.dirs = dirs
        self.logged = logged

    def registry(self, name: str) -> Registry:
        """A registry on the shared store for the registered model ``name``."""
        return Registry(self.ws, Config(registry=RegistryConfig(name=name)))

    def add(self, reg: Registry, *keys: str) -> dict[str, str]:
        """Register the named bundles in order; return key -> version."""
        return {key: str(reg.add_version(self.logged[key]).version) for key in keys}

    def cli_workspace(self, tmp: Path, name: str) -> Path:
        """A workspace whose params.yaml points the CLI at the shared store and model ``name``."""
        tmp.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(self.ws / 'mlflow.db').as_posix()}"
        params = {"tracking": {"uri": uri}, "registry": {"name": name}}
        (tmp / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        return tmp


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Logging points MLflow's process-wide tracking URI (and its env var) at this store: put it back
    # afterwards so later test modules do not write into it.
    previous = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("registry")
    ws = root / "ws"
    dirs = {key: make_bundle(root / "bundles" / key, **kw) for key, kw in BUNDLES.items()}
    # Retrained on new data: its own metrics (on its own split) claim much more than A's.
    dirs["N"] = make_bundle(root / "bundles" / "N", data=NEW_DATA, ndcg=0.50, cold=0.50)
    reg = Registry(ws)
    logged = {key: reg.log_bundle(path) for key, path in dirs.items()}
    yield Store(ws, dirs, logged)
    tracking_utils._tracking_uri = previous[0]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous[1] is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous[1]


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def snapshot(reg: Registry) -> tuple[dict[str, str], list[dict[str, Any]], str | None]:
    """Aliases, audit events and the latest-move tag: what a refused operation must leave as is."""
    return reg.aliases(), reg.audit(), reg.model().tags.get(LAST_MOVE)


# ---- bundle manifest -------------------------------------------------------------------------------


def test_manifest_round_trip_and_tampering(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ndcg=0.3, cold=0.3)
    manifest = verify_bundle(bundle)
    assert set(manifest["files"]) == {"encoder.onnx", "scorer.onnx", "tables/items.parquet"}
    assert manifest["metrics"]["warm"]["ndcg@10"] == 0.3

    target = bundle / "tables" / "items.parquet"
    expected = manifest["files"]["tables/items.parquet"]
    data = bytearray(target.read_bytes())
    data[3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"items\.parquet: sha256 mismatch, expected {expected}, got"):
        verify_bundle(bundle)

    target.unlink()
    with pytest.raises(BundleError, match=r"items\.parquet: listed in bundle\.json but missing"):
        verify_bundle(bundle)


def test_manifest_refuses_unlisted_and_escaping_files(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ndcg=0.3, cold=0.3)
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"extra\.bin: not listed"):
        verify_bundle(bundle)
    (bundle / "extra.bin").unlink()

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["../outside"] = "0" * 64
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a relative path inside the bundle"):
        verify_bundle(bundle)

    with pytest.raises(BundleError, match="missing field 'model_card'"):
        write_manifest(bundle, metrics={}, config={}, data_version={}, git_commit="x")
    with pytest.raises(BundleError, match="bundle.json: missing"):
        verify_bundle(tmp_path)


# ---- the gate (pure) -------------------------------------------------------------------------------

CFG = RegistryConfig()


def cand(version: str, *, data: dict[str, str] | None = None, **kw: float) -> Candidate:
    return Candidate(version, metrics(**kw), DATA if data is None else data)


def test_gate_accepts_a_better_challenger() -> None:
    decision = evaluate_gate(cand("2", ndcg=0.32, cold=0.29), cand("1", ndcg=0.30, cold=0.30), CFG)
    assert decision.promote, decision.reasons
    assert not decision.failures
    assert decision.compared["warm.ndcg@10"] == {"challenger": 0.32, "required": ">= 0.05", "champion": 0.30}
    assert decision.compared["champion"] == "1"


def test_gate_message_shows_the_digits_that_decide() -> None:
    """A primary equal to four decimals prints the digits that differ; an exact tie says it loses."""
    champion = cand("1", ndcg=0.22510324, cold=0.30)
    close = evaluate_gate(cand("2", ndcg=0.22510001, cold=0.30), champion, CFG)
    assert close.failures == ["FAIL: warm.ndcg@10 0.225100 > 0.225103 of champion v1"]
    tie = evaluate_gate(cand("2", ndcg=0.22510324, cold=0.30), champion, CFG)
    assert tie.failures == [
        "FAIL: warm.ndcg@10 0.2251 > 0.2251 of champion v1 (an exact tie does not beat it)"
    ]


@pytest.mark.parametrize(
    ("challenger", "failing"),
    [
        ({"ndcg": 0.29, "cold": 0.30}, "warm.ndcg@10"),  # worse
        ({"ndcg": 0.30, "cold": 0.30}, "warm.ndcg@10"),  # a tie does not churn the champion
        ({"ndcg": 0.40, "cold": 0.27}, "cold.recall@20"),  # better, but cold recall drops 0.03 > 0.02
        ({"ndcg": 0.40, "cold": 0.30, "p99": 15.1}, "latency.scorer_p99_ms"),  # > x1.5
        ({"ndcg": 0.40, "cold": 0.30, "cosine": 0.98}, "parity.int8_mean_cosine"),
        ({"ndcg": 0.40, "cold": 0.30, "rel_diff": 0.02}, "parity.ndcg_rel_diff"),
    ],
)
def test_gate_refuses_a_worse_or_regressing_challenger(challenger: dict[str, float], failing: str) -> None:
    decision = evaluate_gate(
        Candidate("2", metrics(**challenger), DATA), cand("1", ndcg=0.30, cold=0.30), CFG
    )
    assert not decision.promote
    assert any(failing in r for r in decision.failures), decision.reasons


def test_gate_cold_drop_within_tolerance_and_margin() -> None:
    champion = cand("1", ndcg=0.30, cold=0.30)
    assert evaluate_gate(cand("2", ndcg=0.31, cold=0.285), champion, CFG).promote
    margin = RegistryConfig(margin=0.05)  # needs >= 0.315
    assert not evaluate_gate(cand("2", ndcg=0.31, cold=0.30), champion, margin).promote
    assert evaluate_gate(cand("2", ndcg=0.315, cold=0.30), champion, margin).promote


def test_gate_compares_cold_figures_only_from_the_same_protocol() -> None:
    """A leak-free cold figure (encoder re-fine-tuned) is not held to one that reused the embeddings."""
    champion = cand("1", ndcg=0.30, cold=0.40)  # registered before the protocol changed: no marker
    retuned = Candidate("2", {**metrics(0.32, 0.30), "cold_protocol": {"encoder_retuned": True}}, DATA)
    decision = evaluate_gate(retuned, champion, CFG)
    assert decision.promote, decision.reasons
    assert any(
        "compared by floor only" in r and "re-fine-tuned here and reused" in r for r in decision.reasons
    )
    # Both made alike: the drop of 0.10 fails as before.
    alike = Candidate("1", {**metrics(0.30, 0.40), "cold_protocol": {"encoder_retuned": True}}, DATA)
    assert not evaluate_gate(retuned, alike, CFG).promote
    assert not evaluate_gate(cand("2", ndcg=0.32, cold=0.30), champion, CFG).promote


def test_gate_refuses_metrics_from_other_evaluation_data() -> None:
    other = {**DATA, "data/split": "split-md5-2"}
    decision = evaluate_gate(cand("2", data=other, ndcg=0.5, cold=0.5), cand("1", ndcg=0.3, cold=0.3), CFG)
    assert not decision.promote
    assert any("not comparable" in r for r in decision.failures)
    # Other data outside eval_data (processed) does not matter; a missing fingerprint does.
    same_split = {**DATA, "data/processed": "other"}
    assert evaluate_gate(
        cand("2", data=same_split, ndcg=0.5, cold=0.5), cand("1", ndcg=0.3, cold=0.3), CFG
    ).promote
    assert not evaluate_gate(
        cand("2", data={}, ndcg=0.5, cold=0.5), cand("1", ndcg=0.3, cold=0.3), CFG
    ).promote
    assert eval_fingerprint({"data/split/train.parquet": "x", "data/splits": "y"}, ["data/split"]) == {
        "data/split/train.parquet": "x"
    }


def test_gate_first_version_needs_the_floors() -> None:
    assert evaluate_gate(cand("1", ndcg=0.06, cold=0.16), None, CFG).promote
    low_warm = evaluate_gate(cand("1", ndcg=0.04, cold=0.5), None, CFG)
    low_cold = evaluate_gate(cand("1", ndcg=0.5, cold=0.10), None, CFG)
    assert not low_warm.promote and any("warm.ndcg@10" in r for r in low_warm.failures)
    assert not low_cold.promote and any("cold.recall@20" in r for r in low_cold.failures)
    missing = evaluate_gate(Candidate("1", {"warm": {"ndcg@10": 0.5}}), None, CFG)
    assert not missing.promote and any("missing" in r for r in missing.failures)


NEW_DATA = {**DATA, "data/split": "split-md5-2"}


def reev(
    champion: dict[str, float], challenger: dict[str, float], of: str = "1", data: dict[str, str] = NEW_DATA
) -> Reevaluation:
    """Champion v1 (measured as ``of``) and challenger v2 measured together on ``data``."""
    measured = {"1": metrics(**champion), "2": metrics(**challenger)}
    for sections in measured.values():  # a measurement has no parity: that is the bundle's own
        sections.pop("parity")
    return Reevaluation(of, "2", data, measured, "test protocol")


def test_reevaluated_gate_compares_the_measurements_not_the_registered_metrics() -> None:
    # Registered on different data, the champion's own numbers are not comparable to the challenger's.
    claims = cand("2", data=NEW_DATA, ndcg=0.50, cold=0.50)
    champion = cand("1", ndcg=0.30, cold=0.30)
    assert any("not comparable" in r for r in evaluate_gate(claims, champion, CFG).failures)

    # Measured together, the challenger's claim of 0.50 counts for the floors only.
    worse = evaluate_gate(
        claims, champion, CFG, reev({"ndcg": 0.31, "cold": 0.3}, {"ndcg": 0.29, "cold": 0.3})
    )
    assert not worse.promote and worse.compared["mode"] == "reevaluated"
    assert worse.failures == ["FAIL: warm.ndcg@10 0.2900 > 0.3100 of champion v1"]
    assert worse.compared["warm.ndcg@10"] == {
        "registered": 0.50,
        "required": ">= 0.05",
        "challenger": 0.29,
        "champion": 0.31,
    }
    assert worse.compared["reevaluation"]["measured"]["1"]["warm.ndcg@10"] == 0.31

    better = evaluate_gate(
        claims, champion, CFG, reev({"ndcg": 0.31, "cold": 0.3}, {"ndcg": 0.33, "cold": 0.3})
    )
    assert better.promote, better.reasons
    # Latency and cold are the measured ones too.
    slow = reev({"ndcg": 0.31, "cold": 0.3, "p99": 2.0}, {"ndcg": 0.33, "cold": 0.25, "p99": 3.5})
    failures = evaluate_gate(claims, champion, CFG, slow).failures
    assert any("cold.recall@20 0.2500 >= 0.2800" in r for r in failures), failures
    assert any("latency.scorer_p99_ms 3.500 <= 3.000" in r for r in failures), failures


def test_reevaluated_gate_refuses_stale_or_foreign_measurements() -> None:
    claims = cand("2", data=NEW_DATA, ndcg=0.50, cold=0.50)
    champion = cand("1", ndcg=0.30, cold=0.30)
    good = ({"ndcg": 0.31, "cold": 0.3}, {"ndcg": 0.40, "cold": 0.3})
    moved = evaluate_gate(claims, champion, CFG, reev(*good, of="3"))
    assert not moved.promote and any("measure again" in r for r in moved.failures)
    elsewhere = evaluate_gate(claims, champion, CFG, reev(*good, data=DATA))
    assert not elsewhere.promote and any(
        "not on the challenger's evaluation data" in r for r in elsewhere.failures
    )
    # The floors still read the bundle: a measured win does not lift a challenger below them.
    low = cand("2", data=NEW_DATA, ndcg=0.04, cold=0.50)
    assert not evaluate_gate(low, champion, CFG, reev(*good)).promote


def test_reevaluated_gate_cold_check_applies_where_the_split_has_cold_items() -> None:
    claims = cand("2", data=NEW_DATA, ndcg=0.50, cold=0.50)
    champion = cand("1", ndcg=0.30, cold=0.30)
    r = reev({"ndcg": 0.31, "cold": 0.3}, {"ndcg": 0.40, "cold": 0.3})
    for sections in r.metrics.values():
        sections.pop("cold")
    decision = evaluate_gate(claims, champion, CFG, r)
    assert decision.promote and any("no cold test items" in x for x in decision.reasons), decision.reasons
    r.metrics["2"]["cold"] = {"recall@20": 0.3}  # measured on one side only: not comparable
    assert not evaluate_gate(claims, champion, CFG, r).promote


def test_champion_history_replays_promotions_and_rollbacks() -> None:
    events = [
        {"action": "challenger", "version": "1"},
        {"action": "promote", "version": "1"},
        {"action": "promote", "version": "2"},
        {"action": "force-promote", "version": "3"},
        {"action": "rollback", "version": "2"},
        {"action": "recovered", "version": "4"},
    ]
    assert champion_history(events) == ["1", "2", "4"]


# ---- the registry on a real store ------------------------------------------------------------------


def test_first_version_becomes_champion_only_past_the_floors(store: Store) -> None:
    reg = store.registry("first")
    versions = store.add(reg, "F")
    with pytest.raises(RegistryError, match="has no champion"):
        reg.champion_uri()
    move = reg.promote(versions["F"])
    assert not move.moved and any("warm.ndcg@10" in r for r in move.decision.failures)  # type: ignore[union-attr]
    assert CHAMPION not in reg.aliases()

    versions.update(store.add(reg, "A"))
    assert reg.aliases() == {CHALLENGER: versions["A"]}
    move = reg.promote(versions["A"], reason="first good one")
    assert move.moved and move.previous is None
    # The challenger alias is retired once its version serves.
    assert reg.aliases() == {CHAMPION: versions["A"]}
    assert reg.champion_uri() == "models:/first@champion"


def test_promotion_gate_rollback_and_audit(store: Store) -> None:
    reg = store.registry("cycle")
    v = store.add(reg, "A", "W", "B", "C")
    assert reg.promote(v["A"]).moved

    refused = reg.promote(v["W"])
    assert not refused.moved and any("warm.ndcg@10" in r for r in refused.decision.failures)  # type: ignore[union-attr]
    assert reg.aliases()[CHAMPION] == v["A"]

    assert reg.promote(v["B"], reason="better ndcg").moved
    assert reg.promote(v["C"]).moved
    assert reg.aliases()[CHAMPION] == v["C"]

    # Audit: an event per move on the promoted version, with when/who/why/from/compared.
    events = reg.audit(v["C"])
    promote = [e for e in events if e["action"] == "promote"][-1]
    assert {"seq", "at", "who", "why", "version", "from_version", "compared", "reasons"} <= promote.keys()
    assert promote["from_version"] == v["B"] and promote["version"] == v["C"]
    assert promote["compared"]["warm.ndcg@10"]["champion"] == 0.32
    assert promote["who"]
    b_event = [e for e in reg.audit(v["B"]) if e["action"] == "promote"][-1]
    assert b_event["why"] == "better ndcg"
    tags = reg.client.get_model_version(reg.name, v["C"]).tags
    assert any(k.startswith(AUDIT_PREFIX) for k in tags)
    assert json.loads(reg.model().tags[LAST_MOVE])["version"] == v["C"]

    # Rollback walks the champion history back: C -> B -> A, then there is nothing before A.
    back = reg.rollback(reason="latency complaints")
    assert back.moved and back.version == v["B"] and back.previous == v["C"]
    assert reg.aliases()[CHAMPION] == v["B"]
    last = json.loads(reg.model().tags[LAST_MOVE])
    assert (
        last["action"] == "rollback"
        and last["why"] == "latency complaints"
        and last["from_version"] == v["C"]
    )
    assert reg.rollback().version == v["A"]
    before = snapshot(reg)
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    assert snapshot(reg) == before

    # Forcing past the gate needs a reason and is audited as such.
    with pytest.raises(RegistryError, match="--reason"):
        reg.promote(v["W"], force=True)
    forced = reg.promote(v["W"], reason="hotfix for a data bug", force=True)
    assert forced.moved and forced.event["action"] == "force-promote"
    assert reg.aliases()[CHAMPION] == v["W"]


def test_unknown_version_and_missing_champion_change_nothing(store: Store) -> None:
    reg = store.registry("errors")
    v = store.add(reg, "A")
    before = snapshot(reg)
    with pytest.raises(RegistryError, match=r"has no version 99 \(versions: 1\)"):
        reg.promote("99")
    with pytest.raises(RegistryError, match="no champion to roll back"):
        reg.rollback()
    with pytest.raises(RegistryError, match="has no champion"):
        reg.show(CHAMPION)
    assert snapshot(reg) == before
    assert reg.show(v["A"])["aliases"] == [CHALLENGER]
    with pytest.raises(RegistryError, match="no registered model 'nothing'"):
        store.registry("nothing").aliases()


def test_interrupted_move_is_reconciled(store: Store) -> None:
    reg = store.registry("crash")
    v = store.add(reg, "A", "B", "C")
    assert reg.promote(v["A"]).moved
    # A crash right after the alias moved, before the audit: the champion passed, its event is missing.
    reg.client.set_registered_model_alias(reg.name, CHAMPION, v["B"])
    assert champion_history(reg.audit()) == [v["A"]]
    back = reg.rollback(reason="undo")  # the next locked operation re-derives B's event first
    assert back.version == v["A"] and back.previous == v["B"]
    actions = [(e["action"], e["version"]) for e in reg.audit()]
    assert ("recovered", v["B"]) in actions and actions[-1] == ("rollback", v["A"])

    # A crash inside a rollback (C back to B): re-derived as that rollback, so the next one reaches A.
    assert reg.promote(v["B"]).moved and reg.promote(v["C"]).moved
    reg.client.set_registered_model_alias(reg.name, CHAMPION, v["B"])
    assert reg.rollback().version == v["A"]
    rederived = [e for e in reg.audit() if e["why"].endswith("re-derived")][-1]
    assert (rederived["action"], rederived["version"], rederived["from_version"]) == (
        "rollback",
        v["B"],
        v["C"],
    )
    assert champion_history(reg.audit())[-1] == v["A"]


def test_alias_moves_wait_for_the_lock(store: Store) -> None:
    from filelock import FileLock

    reg = store.registry("locked")
    v = store.add(reg, "A")
    impatient = Registry(store.ws, Config(registry=RegistryConfig(name="locked", lock_timeout=0.3)))
    before = snapshot(reg)
    with FileLock(str(store.ws / "registry.lock")):
        with pytest.raises(RegistryError, match="another registry operation holds"):
            impatient.promote(v["A"])
        with pytest.raises(RegistryError, match="another registry operation holds"):
            impatient.rollback()
    assert snapshot(reg) == before
    assert impatient.promote(v["A"]).moved


def test_concurrent_promotions_from_threads(store: Store) -> None:
    setup = store.registry("threads")
    v = store.add(setup, "A", "B", "C", "W", "F")
    assert setup.promote(v["A"]).moved
    errors: list[BaseException] = []

    def promote(key: str) -> None:
        try:
            store.registry("threads").promote(v[key])
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(k,)) for k in ("B", "C", "W", "F")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    # Whatever the order, C (the best) ends as champion: B loses to it, W and F never pass.
    assert setup.aliases()[CHAMPION] == v["C"]
    history = champion_history(setup.audit())
    assert history[-1] == v["C"] and set(history) <= {v["A"], v["B"], v["C"]}


def test_concurrent_promotions_from_processes(store: Store, tmp_path: Path) -> None:
    reg = store.registry("procs")
    v = store.add(reg, "A", "B", "C", "F")
    assert reg.promote(v["A"]).moved
    ws = store.cli_workspace(tmp_path / "cli", "procs")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    procs = {
        key: subprocess.Popen(
            [str(METAREC), "registry", "promote", v[key], "-w", str(ws), "--reason", f"race {key}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key in ("B", "C", "F")
    }
    outputs = {key: p.communicate(timeout=120)[0] for key, p in procs.items()}
    assert procs["C"].returncode == 0, outputs["C"]
    assert procs["F"].returncode == 1 and "not promoted" in outputs["F"], outputs["F"]
    assert reg.aliases()[CHAMPION] == v["C"]
    assert champion_history(reg.audit())[-1] == v["C"]


class FakeEngine:
    """Stands in for the export stage's engine: item ``i<rank>`` for every user."""

    def __init__(self, path: str) -> None:
        assert (Path(path) / MANIFEST).is_file()

    def recommend(self, user_id: str, k: int, explain: bool = True) -> list[dict[str, Any]]:
        return [
            {"item_id": f"i{r}", "rank": r, "score": 1.0 / r, "explanation": None} for r in range(1, k + 1)
        ]


def test_register_and_gate_and_corrupted_bundle(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    config = Config(registry=RegistryConfig(name="flow"))
    mlflow.set_tracking_uri(Registry(store.ws).uri)
    experiment = mlflow.get_experiment_by_name("metarec")
    assert experiment is not None
    training = mlflow.MlflowClient().create_run(experiment.experiment_id)
    run_id = training.info.run_id

    first = register_and_gate(store.ws, store.dirs["A"], run_id, config)
    assert first["promoted"] and first["champion"] == first["version"] == "1"
    worse = register_and_gate(store.ws, store.dirs["W"], None, config)
    assert not worse["promoted"] and worse["champion"] == "1"
    assert any("warm.ndcg@10" in r for r in worse["reasons"] if r.startswith("FAIL"))

    reg = open_registry(store.ws, config)
    assert reg.aliases() == {CHAMPION: "1", CHALLENGER: "2"}
    mv = reg.client.get_model_version("flow", "1")
    assert mv.run_id == run_id and mv.description.startswith("# metarec bundle")
    assert mv.tags["metric.warm.ndcg_at_10"] == "0.3" and mv.tags["metarec.git_commit"] == "0123abcd"
    assert json.loads(mv.tags["metarec.data_version"]) == DATA
    assert json.loads(reg.client.get_model_version("flow", "2").tags["metarec.gate"])["promote"] is False
    run_tags = reg.client.get_run(run_id).data.tags
    assert run_tags["metarec.registry.model"] == "flow" and run_tags["metarec.registry.version"] == "1"

    # The stored model: code, bundle, signature and input example, and no pickle anywhere.
    model_dir = Path(reg.client.get_model_version_download_uri("flow", "1").removeprefix("file://"))
    assert (model_dir / "pyfunc_model.py").is_file() and (model_dir / "input_example.json").is_file()
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])] == ["user_id", "k"]
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == [
        "user_id",
        "item_id",
        "rank",
        "score",
    ]

    # Serving: the pyfunc verifies the bundle, hands it to components.bundle.engine.load_bundle (a
    # stand-in engine here) and turns its recommendations into the signature's columns.
    loader = types.ModuleType("components.bundle.engine")
    loader.load_bundle = lambda path: FakeEngine(path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "components.bundle.engine", loader)
    served = mlflow.pyfunc.load_model(reg.champion_uri())
    out = served.predict(pd.DataFrame({"user_id": ["7", "8"], "k": [2, 3]}))
    assert list(out.columns) == ["user_id", "item_id", "rank", "score"]
    assert out["user_id"].tolist() == ["7", "7", "8", "8", "8"] and out["rank"].tolist() == [1, 2, 1, 2, 3]

    # A better challenger whose stored bundle is then corrupted: verify names the file, promote refuses.
    better = reg.register(store.dirs["C"], run_id)
    version = str(better.version)
    assert reg.verify(version)["metrics"]["warm"]["ndcg@10"] == 0.35
    stored = Path(reg.client.get_model_version_download_uri("flow", version).removeprefix("file://"))
    scorer = next(stored.rglob("scorer.onnx"))
    data = bytearray(scorer.read_bytes())
    data[0] ^= 0x01
    scorer.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"scorer\.onnx: sha256 mismatch, expected [0-9a-f]{64}, got"):
        reg.verify(version)
    before = snapshot(reg)
    move = reg.promote(version)
    assert not move.moved and "scorer.onnx" in move.decision.reasons[0]  # type: ignore[union-attr]
    assert snapshot(reg) == before
    forced = reg.promote(version, reason="force cannot skip integrity", force=True)
    assert not forced.moved and snapshot(reg) == before
    # Serving verifies too: loading the corrupted version fails on the file before anything else.
    with pytest.raises(Exception, match=r"scorer\.onnx"):
        mlflow.pyfunc.load_model(f"models:/flow/{version}")


def test_cli_list_show_promote_rollback(store: Store, tmp_path: Path) -> None:
    reg = store.registry("cli")
    v = store.add(reg, "A", "B")
    ws = str(store.cli_workspace(tmp_path / "cli", "cli"))

    code, out = invoke("registry", "show", "champion", "-w", ws)
    assert code == 1 and "has no champion" in out
    code, out = invoke("registry", "rollback", "-w", ws)
    assert code == 1 and "no champion to roll back" in out
    code, out = invoke("registry", "promote", "42", "-w", ws)
    assert code == 1 and "has no version 42" in out

    code, out = invoke("registry", "promote", v["A"], "-w", ws, "--reason", "first")
    assert code == 0 and "champion: version 1" in out, out
    code, out = invoke("registry", "promote", v["B"], "-w", ws)
    assert code == 0 and "pass: warm.ndcg@10 0.3200 > 0.3000" in out, out

    code, out = invoke("registry", "list", "-w", ws)
    assert code == 0 and "champion" in out and "0.3200" in out and "0.3000" in out, out
    code, out = invoke("registry", "show", "champion", "-w", ws, "--json")
    shown = json.loads(out)
    assert shown["version"] == v["B"] and shown["aliases"] == [CHAMPION]
    assert [e["action"] for e in shown["audit"]] == ["challenger", "promote"]
    code, out = invoke("registry", "show", v["B"], "-w", ws)
    assert code == 0 and "metarec.git_commit = 0123abcd" in out and "# metarec bundle" in out

    code, out = invoke("registry", "rollback", "-w", ws, "--reason", "oops")
    assert code == 0 and "champion: version 1, rolled back from 2" in out
    code, out = invoke("registry", "promote", v["A"], "-w", ws)
    assert code == 1 and "already the champion" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = invoke("registry", "list", "-w", str(empty))
    assert code == 1 and "no MLflow store" in out


def training_run(reg: Registry) -> str:
    """A fresh run in the workspace's experiment, standing in for a training run."""
    experiment = reg.client.get_experiment_by_name("metarec")
    assert experiment is not None
    return str(reg.client.create_run(experiment.experiment_id).info.run_id)


def test_register_is_idempotent_per_training_run(store: Store) -> None:
    config = Config(registry=RegistryConfig(name="retry"))
    reg = open_registry(store.ws, config)
    run_id = training_run(reg)
    first = register_and_gate(store.ws, store.dirs["A"], run_id, config)
    again = register_and_gate(store.ws, store.dirs["A"], run_id, config)
    # The retry finds the version and reports the promotion that made it champion.
    assert first["version"] == again["version"] == "1" and first["promoted"] and again["promoted"]
    assert again["reasons"] == first["reasons"] and again["gate"] == "registered"
    assert str(reg.register(store.dirs["A"], run_id).version) == "1"
    assert [str(mv.version) for mv in reg.versions()] == ["1"]
    assert [e["action"] for e in reg.audit()] == ["challenger", "promote"]

    # A crash right after the version was created, before its alias and audit: the retry resumes.
    run2 = training_run(reg)
    logged = reg.log_bundle(store.dirs["B"], run2)
    reg.client.create_model_version(
        reg.name,
        source=logged.model_uri,
        run_id=run2,
        tags=reg._version_tags(logged.manifest, logged.digest),
        model_id=logged.model_id,
    )
    resumed = register_and_gate(store.ws, store.dirs["B"], run2, config)
    assert resumed["version"] == "2" and resumed["promoted"], resumed["reasons"]
    assert [str(mv.version) for mv in reg.versions()] == ["2", "1"]
    assert ("challenger", "2") in [(e["action"], e["version"]) for e in reg.audit()]

    # A crash after the promotion, before the gate's tag: the retry writes it, promoting nothing twice.
    reg.client.delete_model_version_tag(reg.name, "2", "metarec.gate")
    done = register_and_gate(store.ws, store.dirs["B"], run2, config)
    assert done["version"] == "2" and done["promoted"] and done["reasons"] == resumed["reasons"]
    assert json.loads(reg.version("2").tags["metarec.gate"])["promote"] is True
    assert [e["action"] for e in reg.audit("2")] == ["challenger", "promote"]
    assert len(reg.versions()) == 2
    assert reg.client.get_run(run2).data.tags["metarec.registry.version"] == "2"


class TableMeasurer:
    """Measures a bundle as a table says, keyed by the warm ndcg its bundle claims.

    Stands in for the split evaluation of ``components.retrain.SplitReevaluator`` (exercised on real
    bundles in ``tests/operations/test_retrain_gate.py``); what is tested here is the registry's side of it.
    """

    protocol = "table"

    def __init__(self, table: dict[float, dict[str, Any]], data: dict[str, str]) -> None:
        self.table = table
        self.data_version = data
        self.seen: list[str] = []

    def measure(self, bundles: dict[str, Path]) -> dict[str, dict[str, Any]]:
        out = {}
        for version, path in bundles.items():
            manifest = verify_bundle(path)  # the registry hands over downloaded, verified bundles
            self.seen.append(version)
            sections = metrics(**self.table[manifest["metrics"]["warm"]["ndcg@10"]])
            sections.pop("parity")
            out[version] = sections
        return out


def test_register_and_gate_reevaluates_the_champion_after_a_retrain(store: Store) -> None:
    config = Config(registry=RegistryConfig(name="regate"))
    assert register_and_gate(store.ws, store.dirs["A"], None, config)["promoted"]
    # Retrained on new data: the bundle claims 0.50, but measured with A on its split it is worse.
    worse = TableMeasurer({0.30: {"ndcg": 0.31, "cold": 0.3}, 0.50: {"ndcg": 0.29, "cold": 0.3}}, NEW_DATA)
    out = register_and_gate(store.ws, store.dirs["N"], None, config, worse)
    assert sorted(worse.seen) == ["1", "2"]
    assert not out["promoted"] and out["champion"] == "1" and out["gate"] == "reevaluated"
    assert out["decision"]["compared"]["warm.ndcg@10"]["registered"] == 0.50
    reg = open_registry(store.ws, config)
    tag = json.loads(reg.version("2").tags["metarec.gate"])
    assert tag["gate"] == "reevaluated" and not tag["promote"]
    assert any(r.startswith("FAIL: warm.ndcg@10 0.2900 > 0.3100") for r in tag["reasons"])

    # Measured better, it is promoted through the gate: an ordinary audited promotion, no force.
    better = TableMeasurer({0.30: {"ndcg": 0.31, "cold": 0.3}, 0.50: {"ndcg": 0.33, "cold": 0.3}}, NEW_DATA)
    again = gate(reg, "2", "retrain", better)
    assert again["promoted"] and again["champion"] == "2", again["reasons"]
    event = reg.audit("2")[-1]
    assert event["action"] == "promote" and event["compared"]["mode"] == "reevaluated"
    assert not [e for e in reg.audit() if e["action"] == "force-promote"]
