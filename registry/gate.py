"""The promotion gate: a pure decision whether a challenger may replace the champion.

Rules (thresholds in :class:`metarec.config.RegistryConfig`):

* Always (absolute): the primary and cold metrics reach their floors; ONNX parity holds
  (``parity.int8_mean_cosine >= min_int8_cosine``, ``parity.ndcg_rel_diff <= max_ndcg_rel_diff``).
  The floors are what lets the first version become champion with nothing to compare to, and they
  keep applying afterwards so a champion never drops below them.
* Against a champion: both must have been evaluated on the same data (equal ``data_version``
  fingerprints over ``eval_data``), else the metrics are not comparable and the gate refuses. Then the
  primary metric must beat the champion's by the relative ``margin`` (``>= champion * (1 + margin)``;
  strictly greater when the margin is 0, so a tie keeps the incumbent), the cold metric may drop at
  most ``max_cold_drop`` (absolute), and the scorer's p99 latency may grow at most
  ``max_latency_growth`` times.

A missing metric fails its check: the gate never promotes on numbers it could not see.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from metarec.config import RegistryConfig

PASS = "pass"
FAIL = "FAIL"


@dataclass(frozen=True)
class Candidate:
    """What the gate knows about one model version: its bundle's metrics and data version."""

    version: str
    metrics: dict[str, Any]
    data_version: dict[str, str] = field(default_factory=dict)


@dataclass
class GateDecision:
    """The gate's verdict: promote or not, one reason per check, and the numbers it compared."""

    promote: bool
    reasons: list[str]
    compared: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Return the decision as a JSON-ready dict."""
        return asdict(self)

    @property
    def failures(self) -> list[str]:
        """The reasons of the checks that failed."""
        return [r for r in self.reasons if r.startswith(FAIL)]


def metric(metrics: dict[str, Any], dotted: str) -> float | None:
    """Look up ``section.metric`` (``warm.ndcg@10``) in a bundle's metrics; None when absent."""
    section, _, name = dotted.partition(".")
    value = (metrics.get(section) or {}).get(name) if isinstance(metrics.get(section), dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def eval_fingerprint(data_version: dict[str, str], paths: list[str]) -> dict[str, str]:
    """The entries of ``data_version`` that identify the evaluation data (``paths`` and below them)."""
    prefixes = [p.rstrip("/") for p in paths]
    return {
        key: value
        for key, value in sorted(data_version.items())
        if any(key == p or key.startswith(p + "/") for p in prefixes)
    }


class _Checks:
    """Collects check outcomes into reasons and compared numbers."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.compared: dict[str, Any] = {}
        self.ok = True

    def add(self, passed: bool, text: str) -> None:
        self.ok = self.ok and passed
        self.reasons.append(f"{PASS if passed else FAIL}: {text}")

    def missing(self, name: str, whose: str) -> None:
        self.add(False, f"{name} missing from the {whose}'s metrics")

    def absolute(self, metrics: dict[str, Any], name: str, bound: float, at_least: bool) -> None:
        value = metric(metrics, name)
        self.compared.setdefault(name, {})["challenger"] = value
        self.compared[name]["required"] = f"{'>=' if at_least else '<='} {bound:g}"
        if value is None:
            self.missing(name, "challenger")
            return
        passed = value >= bound if at_least else value <= bound
        self.add(passed, f"{name} {value:.4f} {'>=' if at_least else '<='} {bound:g} (absolute)")


def evaluate_gate(challenger: Candidate, champion: Candidate | None, cfg: RegistryConfig) -> GateDecision:
    """Decide whether ``challenger`` may become champion in place of ``champion`` (None: no champion).

    Args:
        challenger: The version proposed for promotion.
        champion: The current champion, or None when the model has none yet.
        cfg: Thresholds and metric names.

    Returns:
        The decision; ``reasons`` holds one ``"pass: ..."`` or ``"FAIL: ..."`` line per check.
    """
    checks = _Checks()
    checks.compared["challenger"] = challenger.version
    checks.compared["champion"] = champion.version if champion else None
    if champion is not None and champion.version == challenger.version:
        checks.add(False, f"version {challenger.version} is already the champion")
        return GateDecision(False, checks.reasons, checks.compared)

    mine = challenger.metrics
    checks.absolute(mine, cfg.primary, cfg.min_primary, at_least=True)
    checks.absolute(mine, cfg.cold_metric, cfg.min_cold, at_least=True)
    checks.absolute(mine, "parity.int8_mean_cosine", cfg.min_int8_cosine, at_least=True)
    checks.absolute(mine, "parity.ndcg_rel_diff", cfg.max_ndcg_rel_diff, at_least=False)

    if champion is None:
        checks.add(True, "no champion yet: absolute floors only")
        return GateDecision(checks.ok, checks.reasons, checks.compared)

    ours = eval_fingerprint(challenger.data_version, cfg.eval_data)
    theirs = eval_fingerprint(champion.data_version, cfg.eval_data)
    checks.compared["eval_data"] = {"challenger": ours, "champion": theirs}
    if not ours or ours != theirs:
        what = "has no fingerprint of" if not ours else "differs from the champion's on"
        checks.add(
            False,
            f"evaluation data {what} {cfg.eval_data}: metrics are not comparable "
            f"(challenger {ours or '-'}, champion v{champion.version} {theirs or '-'})",
        )
        return GateDecision(False, checks.reasons, checks.compared)
    checks.add(True, f"same evaluation data as champion v{champion.version}")

    theirs_metrics = champion.metrics
    # Primary: must beat the champion by the margin.
    new, old = metric(mine, cfg.primary), metric(theirs_metrics, cfg.primary)
    checks.compared[cfg.primary]["champion"] = old
    if new is None or old is None:
        checks.missing(cfg.primary, "challenger" if new is None else "champion")
    else:
        need = old * (1 + cfg.margin)
        passed = new > old if cfg.margin == 0 else new >= need
        relation = (
            f"> {old:.4f}" if cfg.margin == 0 else f">= {need:.4f} (champion {old:.4f} +{cfg.margin:.1%})"
        )
        checks.add(passed, f"{cfg.primary} {new:.4f} {relation} of champion v{champion.version}")

    # Cold metric: may not drop more than max_cold_drop.
    new, old = metric(mine, cfg.cold_metric), metric(theirs_metrics, cfg.cold_metric)
    checks.compared[cfg.cold_metric]["champion"] = old
    if new is None or old is None:
        checks.missing(cfg.cold_metric, "challenger" if new is None else "champion")
    else:
        floor = old - cfg.max_cold_drop
        checks.add(
            new >= floor,
            f"{cfg.cold_metric} {new:.4f} >= {floor:.4f} (champion {old:.4f} - {cfg.max_cold_drop:g})",
        )

    # Latency: scorer p99 may grow at most max_latency_growth times.
    name = "latency.scorer_p99_ms"
    new, old = metric(mine, name), metric(theirs_metrics, name)
    checks.compared[name] = {"challenger": new, "champion": old}
    if new is None or old is None:
        checks.missing(name, "challenger" if new is None else "champion")
    else:
        ceiling = old * cfg.max_latency_growth
        checks.compared[name]["required"] = f"<= {ceiling:g}"
        checks.add(
            new <= ceiling,
            f"{name} {new:.3f} <= {ceiling:.3f} (champion {old:.3f} x{cfg.max_latency_growth:g})",
        )
    return GateDecision(checks.ok, checks.reasons, checks.compared)
