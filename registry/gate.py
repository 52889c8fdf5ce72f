"""The promotion gate: a pure decision whether a challenger may replace the champion.

Rules (thresholds in :class:`components.core.config.RegistryConfig`):

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

Two modes compare against a champion (``compared["mode"]``):

* ``registered``: each version's own metrics from its bundle, comparable only on equal fingerprints.
* ``reevaluated`` (after a retrain, when the champion was evaluated on older data): a
  :class:`Reevaluation` in which one process measured champion and challenger on the challenger's
  evaluation data with the same histories, the same cold-item slice and the same latency benchmark.
  The relative checks compare those measurements; the absolute floors and parity still read the
  challenger's bundle. The cold check applies only where the split has cold test items (both measured
  or neither); otherwise it is reported as not applicable and only the cold floor holds.

A missing metric fails its check: the gate never promotes on numbers it could not see.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from components.core.config import RegistryConfig

PASS = "pass"
FAIL = "FAIL"
REGISTERED = "registered"
REEVALUATED = "reevaluated"
LATENCY = "latency.scorer_p99_ms"


@dataclass(frozen=True)
class Candidate:
    """What the gate knows about one model version: its bundle's metrics and data version."""

    version: str
    metrics: dict[str, Any]
    data_version: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reevaluation:
    """Champion and challenger measured by one process, on the same data, with one protocol.

    ``metrics`` maps each version to its measured sections (``warm``; ``cold`` where the split has
    cold test items; ``latency``); ``data_version`` is the data they were measured on.
    """

    champion: str
    challenger: str
    data_version: dict[str, str]
    metrics: dict[str, dict[str, Any]]
    protocol: str = ""

    def summary(self, cfg: RegistryConfig) -> dict[str, Any]:
        """The compared numbers per version (primary, cold, latency) and the protocol, for the audit."""
        names = (cfg.primary, cfg.cold_metric, LATENCY)
        per_version = {v: {n: metric(m, n) for n in names} for v, m in sorted(self.metrics.items())}
        return {"champion": self.champion, "protocol": self.protocol, "measured": per_version}


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


def cold_protocol(metrics: dict[str, Any]) -> str:
    """How a version's cold figure was made: ``re-fine-tuned`` without the cold items, or ``reused``."""
    section = metrics.get("cold_protocol")
    retuned = isinstance(section, dict) and section.get("encoder_retuned") is True
    return "re-fine-tuned" if retuned else "reused"


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


def decimals(a: float, b: float, least: int = 4) -> int:
    """Decimals that tell ``a`` from ``b`` (at least ``least``; ``least`` when they are equal)."""
    for d in range(least, 18):
        if f"{a:.{d}f}" != f"{b:.{d}f}":
            return d
    return least


def evaluate_gate(
    challenger: Candidate,
    champion: Candidate | None,
    cfg: RegistryConfig,
    reevaluation: Reevaluation | None = None,
) -> GateDecision:
    """Decide whether ``challenger`` may become champion in place of ``champion`` (None: no champion).

    Args:
        challenger: The version proposed for promotion.
        champion: The current champion, or None when the model has none yet.
        cfg: Thresholds and metric names.
        reevaluation: Both versions measured on the challenger's data (``reevaluated`` mode); None
            compares their registered metrics (``registered`` mode).

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

    if reevaluation is None:
        checks.compared["mode"] = REGISTERED
        if not _same_data(checks, challenger, champion, cfg):
            return GateDecision(False, checks.reasons, checks.compared)
        _versus(checks, mine, champion.metrics, champion.version, cfg, cold_optional=False)
    else:
        checks.compared["mode"] = REEVALUATED
        if not _measured_together(checks, challenger, champion, reevaluation, cfg):
            return GateDecision(False, checks.reasons, checks.compared)
        for name in (cfg.primary, cfg.cold_metric):
            # The floors above read the bundle; what follows compares the measurements.
            checks.compared[name]["registered"] = checks.compared[name].pop("challenger")
        measured = reevaluation.metrics
        theirs = measured[champion.version]
        _versus(checks, measured[challenger.version], theirs, champion.version, cfg, cold_optional=True)
    return GateDecision(checks.ok, checks.reasons, checks.compared)


def _same_data(checks: _Checks, challenger: Candidate, champion: Candidate, cfg: RegistryConfig) -> bool:
    """Registered mode: both versions' metrics come from the same evaluation data."""
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
        return False
    checks.add(True, f"same evaluation data as champion v{champion.version}")
    return True


def _measured_together(
    checks: _Checks, challenger: Candidate, champion: Candidate, reev: Reevaluation, cfg: RegistryConfig
) -> bool:
    """Reevaluated mode: the measurement covers these two versions, on the challenger's data."""
    ours = eval_fingerprint(challenger.data_version, cfg.eval_data)
    measured_on = eval_fingerprint(reev.data_version, cfg.eval_data)
    checks.compared["eval_data"] = {"challenger": ours, "measured_on": measured_on}
    checks.compared["reevaluation"] = reev.summary(cfg)
    if reev.champion != champion.version or reev.challenger != challenger.version:
        checks.add(
            False,
            f"the re-evaluation measured v{reev.challenger} against v{reev.champion}, but the champion "
            f"is now v{champion.version}: measure again",
        )
        return False
    if not {champion.version, challenger.version} <= reev.metrics.keys():
        checks.add(
            False, f"the re-evaluation has no measurement of v{champion.version} or v{challenger.version}"
        )
        return False
    if not ours or ours != measured_on:
        checks.add(
            False,
            f"the re-evaluation ran on {measured_on or '-'}, not on the challenger's evaluation data "
            f"{ours or '-'} ({cfg.eval_data})",
        )
        return False
    checks.add(
        True,
        f"champion v{champion.version} and challenger re-evaluated together on the challenger's "
        f"evaluation data ({reev.protocol or 'one protocol'})",
    )
    return True


def _versus(
    checks: _Checks,
    mine: dict[str, Any],
    theirs: dict[str, Any],
    champion: str,
    cfg: RegistryConfig,
    cold_optional: bool,
) -> None:
    """The checks against the champion: primary margin, cold drop, latency growth."""
    # Primary: must beat the champion by the margin.
    new, old = metric(mine, cfg.primary), metric(theirs, cfg.primary)
    checks.compared[cfg.primary].update(challenger=new, champion=old)
    if new is None or old is None:
        checks.missing(cfg.primary, "challenger" if new is None else "champion")
    else:
        need = old * (1 + cfg.margin)
        passed = new > old if cfg.margin == 0 else new >= need
        d = decimals(new, need)  # "0.2251 > 0.2251" would read like a bug when the fourth digit ties
        relation = (
            f"> {old:.{d}f}"
            if cfg.margin == 0
            else f">= {need:.{d}f} (champion {old:.{d}f} +{cfg.margin:.1%})"
        )
        tie = " (an exact tie does not beat it)" if new == need else ""
        checks.add(passed, f"{cfg.primary} {new:.{d}f} {relation} of champion v{champion}{tie}")

    # Cold metric: may not drop more than max_cold_drop.
    new, old = metric(mine, cfg.cold_metric), metric(theirs, cfg.cold_metric)
    checks.compared[cfg.cold_metric].update(challenger=new, champion=old)
    if new is None and old is None and cold_optional:
        # A frozen bundle cannot be refitted with items made cold; the measured cold slice needs test
        # interactions on items without training interactions, and this split has none.
        checks.add(True, f"{cfg.cold_metric}: no cold test items in this split, compared by floor only")
    elif new is None or old is None:
        checks.missing(cfg.cold_metric, "challenger" if new is None else "champion")
    elif cold_protocol(mine) != cold_protocol(theirs):
        # Before the cold refit re-fine-tuned the encoder, its figure reused embeddings that had seen the
        # cold items: the two numbers measure different things, so only the floor applies.
        checks.add(
            True,
            f"{cfg.cold_metric}: measured with the encoder {cold_protocol(mine)} here and "
            f"{cold_protocol(theirs)} for champion v{champion}; compared by floor only",
        )
    else:
        floor = old - cfg.max_cold_drop
        checks.add(
            new >= floor,
            f"{cfg.cold_metric} {new:.4f} >= {floor:.4f} (champion {old:.4f} - {cfg.max_cold_drop:g})",
        )

    # Latency: scorer p99 may grow at most max_latency_growth times.
    new, old = metric(mine, LATENCY), metric(theirs, LATENCY)
    checks.compared[LATENCY] = {"challenger": new, "champion": old}
    if new is None or old is None:
        checks.missing(LATENCY, "challenger" if new is None else "champion")
    else:
        ceiling = old * cfg.max_latency_growth
        checks.compared[LATENCY]["required"] = f"<= {ceiling:g}"
        checks.add(
            new <= ceiling,
            f"{LATENCY} {new:.3f} <= {ceiling:.3f} (champion {old:.3f} x{cfg.max_latency_growth:g})",
        )
