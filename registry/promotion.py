"""The one promotion path (register → gate → promote) that training and retraining both end in.

:func:`register_and_gate` registers the exported bundle as ``challenger`` (idempotent per training
run), gates it against the champion in the ``registered`` mode, or in the ``reevaluated`` mode given a
:class:`registry.store.Measurer` (the retrain flow's ``components.retrain.SplitReevaluator``), and
promotes it through the locked, audited ``Registry.promote`` if it passes; the decision is kept on the
version as the ``metarec.gate`` tag, written here only. :func:`champion_bundle` hands the champion's
bundle to the flows that feed it to components (the drift reference).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.bundle.format import BundleError, verify_bundle
from components.core.config import Config
from registry.gate import REEVALUATED, REGISTERED, GateDecision
from registry.store import CHAMPION, PROMOTING, Measurer, Registry, open_registry

GATE_TAG = "metarec.gate"


def register_and_gate(
    workspace: str | Path,
    bundle_dir: str | Path,
    run_id: str | None,
    config: Config | None = None,
    measurer: Measurer | None = None,
) -> dict[str, Any]:
    """Register a bundle as challenger, gate it against the champion and promote it if it passes.

    Idempotent per training run: a retry registers no second version and resumes the gate. Returns
    :func:`gate`'s outcome.
    """
    registry = open_registry(workspace, config)
    mv = registry.register(bundle_dir, run_id)
    why = "passed the re-evaluation gate after retraining" if measurer else "passed the gate after training"
    return gate(registry, mv.version, why, measurer)


def gate(registry: Registry, ref: str | int, reason: str, measurer: Measurer | None = None) -> dict[str, Any]:
    """Gate a version against the champion, promote it if it passes, keep the decision on it.

    With a ``measurer`` and another champion the gate runs in ``reevaluated`` mode (both measured
    now, side by side), else in ``registered`` mode. A version that already is champion (a retry
    after its promotion) reports the promotion that made it so instead of gating again.

    Returns:
        ``{"version", "promoted", "champion", "gate", "reasons", "decision"}``.
    """
    version = str(registry.version(ref).version)
    champion = registry.aliases().get(CHAMPION)
    if champion == version:
        decision, promoted = _promotion_of(registry, version), True
    else:
        try:
            reevaluation = registry.reevaluate(version, measurer) if measurer and champion else None
        except BundleError as exc:
            bad = GateDecision(False, [f"FAIL: bundle integrity: {exc}"], {"mode": REEVALUATED})
            decision, promoted = bad, False
        else:
            move = registry.promote(version, reason=reason, reevaluation=reevaluation)
            decision, promoted = move.decision or GateDecision(False, [], {}), move.moved
    tag = record_gate(registry, version, decision)
    return {
        "version": version,
        "promoted": promoted,
        "champion": registry.aliases().get(CHAMPION),
        "gate": tag["gate"],
        "reasons": decision.reasons,
        "decision": tag,
    }


def record_gate(registry: Registry, version: str, decision: GateDecision) -> dict[str, Any]:
    """Keep a gate decision on its version as the ``metarec.gate`` tag; return the tag's content."""
    tag = {**decision.to_dict(), "gate": decision.compared.get("mode") or REGISTERED}
    text = json.dumps(tag, sort_keys=True, default=str)
    registry.client.set_model_version_tag(registry.name, version, GATE_TAG, text)
    return tag


def _promotion_of(registry: Registry, version: str) -> GateDecision:
    """The decision recorded with the latest move that made ``version`` champion."""
    moves = [e for e in registry.audit(version) if e.get("action") in PROMOTING]
    last = moves[-1] if moves else {}
    return GateDecision(True, list(last.get("reasons") or []), dict(last.get("compared") or {}))


def champion_bundle(workspace: Path, cfg: Config) -> tuple[str, Path]:
    """Download (once per version) and verify the champion's bundle into the workspace's cache.

    Returns:
        The champion version and its bundle directory.

    Raises:
        registry.store.RegistryError: No registered model or no champion.
    """
    registry = open_registry(workspace, cfg, must_exist=True)
    version = str(registry.version(CHAMPION).version)
    cache = Path(workspace) / ".cache" / "champions"
    target = cache / version
    found = _bundle_in(target)
    if found is None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=cache))
        try:
            local, _ = registry.download_bundle(version, tmp)
            relative = Path(local).resolve().relative_to(tmp.resolve())
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            found = target / relative
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    verify_bundle(found)  # also when cached: a file altered on disk must not be trusted
    return version, found


def _bundle_in(target: Path) -> Path | None:
    """The bundle directory (holding ``bundle.json``) of a downloaded version, if complete."""
    if not target.is_dir():
        return None
    for manifest in sorted(target.rglob("bundle.json"), key=lambda p: len(p.parts)):
        return manifest.parent
    return None
