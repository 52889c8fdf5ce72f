"""Drift report: one PNG per check, a self-contained HTML page, MLflow metrics and artifacts, and the
verdict as a node_exporter textfile for Prometheus alerts (:func:`write_textfile`)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.drift.checks import CheckResult, DriftResult

HTML_FILE = "drift_report.html"
JSON_FILE = "drift.json"
#: node_exporter's textfile-collector directory (its ``--collector.textfile.directory``); unset: no file.
TEXTFILE_DIR_ENV = "METAREC_DRIFT_TEXTFILE_DIR"
#: The gauges :func:`write_textfile` writes (the alert rules and their tests rely on these names).
TEXTFILE_METRICS = (
    "metarec_drift_detected",
    "metarec_drift_check_fired",
    "metarec_drift_window_events",
    "metarec_drift_last_check_timestamp_seconds",
)
# MLflow accepts letters, digits, '_', '-', '.', ' ' and '/' in metric names.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")

_REF_COLOR = "#8d99ae"
_CUR_COLOR = "#e76f51"
_STATUS_COLOR = {
    "ok": "#2a9d8f",
    "drift": "#e63946",
    "insufficient_data": "#b8860b",
    "not_applicable": "#adb5bd",
}


def safe_name(name: str) -> str:
    """An MLflow-safe metric name: ``@`` becomes ``_at_``, any other unsafe character ``_``."""
    return _UNSAFE.sub("_", name.replace("@", "_at_"))


def metrics(result: DriftResult) -> dict[str, float]:
    """Every finite statistic as ``drift.<check>.<stat>``, plus fired flags and the overall verdict.

    Insufficient or not-applicable checks contribute only ``drift.<check>.fired = 0`` and
    ``drift.<check>.evaluated = 0`` (MLflow charts NaN badly, so missing values are left out).

    Args:
        result: The checks of one window.

    Returns:
        Metric name -> value.
    """
    out: dict[str, float] = {
        "drift.drifted": float(result.drifted),
        "drift.n_fired": float(len(result.fired)),
        "drift.n_events": float(result.n_events),
        "drift.n_input_events": float(result.n_input_events),
    }
    for c in result.checks:
        prefix = f"drift.{safe_name(c.name)}"
        out[f"{prefix}.fired"] = float(c.fired)
        evaluated = c.status in ("ok", "drift")
        out[f"{prefix}.evaluated"] = float(evaluated)
        if evaluated:
            out[f"{prefix}.threshold"] = float(c.threshold)
        for key, value in ({c.statistic_name: c.statistic} | c.values).items():
            if isinstance(value, int | float) and math.isfinite(value):
                out[f"{prefix}.{safe_name(key)}"] = float(value)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(c: CheckResult) -> str:
    verdict = {
        "ok": "ok",
        "drift": "DRIFT",
        "insufficient_data": "insufficient data",
        "not_applicable": "n/a",
    }
    return f"{c.name}: {verdict[c.status]}"


def _plot_check(c: CheckResult, path: Path) -> None:
    """Draw one check's figure: reference vs current bars, a threshold line, or a scatter."""
    plt = _pyplot()
    plot = c.plot
    fig, ax = plt.subplots(figsize=(9, 4.2))
    if "reference" in plot and "labels" in plot:
        labels = [str(x) for x in plot["labels"]]
        xs = list(range(len(labels)))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], plot["reference"], width, label="reference", color=_REF_COLOR)
        ax.bar([x + width / 2 for x in xs], plot["current"], width, label="current window", color=_CUR_COLOR)
        ax.set_xticks(
            xs, labels, rotation=45 if len(labels) > 12 else 0, ha="right" if len(labels) > 12 else "center"
        )
        ax.set_ylabel("share of events")
        ax.set_xlabel(plot.get("xlabel", ""))
        ax.legend()
    elif "reference" in plot:
        ref = plot["reference"]
        cur = plot["current"]
        ax.scatter(
            [p[0] for p in ref], [p[1] for p in ref], s=8, alpha=0.5, color=_REF_COLOR, label="training items"
        )
        ax.scatter(
            [p[0] for p in cur], [p[1] for p in cur], s=12, alpha=0.8, color=_CUR_COLOR, label="new items"
        )
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
        ax.legend()
    elif "values" in plot:
        ax.bar(plot["labels"], plot["values"], color=[_REF_COLOR, _CUR_COLOR])
        ax.axhline(
            plot["threshold"], color="#e63946", linestyle="--", label=f"threshold {plot['threshold']:.3g}"
        )
        ax.legend()
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, c.message, ha="center", va="center", wrap=True)
    ax.set_title(f"{_title(c)}\n{c.message}", fontsize=9, color=_STATUS_COLOR[c.status])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.4g}"


def _html(result: DriftResult, pngs: dict[str, Path]) -> str:
    verdict = "DRIFT DETECTED: " + ", ".join(result.fired) if result.drifted else "No drift detected"
    rows = []
    for c in result.checks:
        color = _STATUS_COLOR[c.status]
        rows.append(
            "<tr>"
            f"<td>{html.escape(c.name)}</td><td>{c.group}</td><td>{html.escape(c.statistic_name)}</td>"
            f"<td>{_fmt(c.statistic)}</td><td>{_fmt(c.threshold)}</td>"
            f"<td style='background:{color}'>{html.escape(c.status)}</td>"
            f"<td>{'yes' if c.fired else 'no'}</td><td>{html.escape(c.message)}</td>"
            "</tr>"
        )
    figures = []
    for c in result.checks:
        data = base64.b64encode(pngs[c.name].read_bytes()).decode("ascii")
        figures.append(
            f"<h3 id='{html.escape(c.name)}'>{html.escape(_title(c))}</h3>"
            f"<img alt='{html.escape(c.name)}' src='data:image/png;base64,{data}'>"
        )
    span = ""
    if result.window_start is not None and result.window_end is not None:
        span = f" from ts {result.window_start:.0f} to {result.window_end:.0f}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 0.9em; text-align: left; }}
.verdict {{ font-size: 1.3em; font-weight: bold; color: {"#e63946" if result.drifted else "#2a9d8f"}; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Drift report</h1>
<p class="verdict">{html.escape(verdict)}</p>
<p>{result.n_events} feedback events ({result.n_input_events} clicks/ratings){span}.</p>
<table><tr><th>check</th><th>group</th><th>statistic</th><th>value</th><th>threshold</th><th>status</th>
<th>fired</th><th>details</th></tr>
{"".join(rows)}
</table>
{"".join(figures)}
</body></html>
"""


def render(result: DriftResult, out_dir: Path) -> list[Path]:
    """Write one PNG per check, ``drift_report.html`` (PNGs inlined) and ``drift.json`` into ``out_dir``.

    Args:
        result: The checks of one window.
        out_dir: Created if missing.

    Returns:
        The written files: the PNGs in check order, then the HTML and the JSON.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, Path] = {}
    for c in result.checks:
        path = out / f"drift_{safe_name(c.name).replace(' ', '_').replace('/', '_')}.png"
        _plot_check(c, path)
        pngs[c.name] = path
    page = out / HTML_FILE
    page.write_text(_html(result, pngs), encoding="utf-8")
    summary = out / JSON_FILE
    summary.write_text(json.dumps(_jsonable(result.to_dict()), indent=2), encoding="utf-8")
    return [*pngs.values(), page, summary]


def _jsonable(value: Any) -> Any:
    """NaN and infinities become None: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def log_to_mlflow(
    result: DriftResult, out_dir: Path, artifact_path: str = "drift", step: int | None = None
) -> None:
    """Render the report and log it with :func:`metrics` to the active MLflow run.

    Args:
        result: The checks of one window.
        out_dir: Where the files are rendered before upload.
        artifact_path: Artifact folder in the run.
        step: Metric step (e.g. the window index) so successive windows form a chart.
    """
    import mlflow

    files = render(result, out_dir)
    mlflow.log_metrics(metrics(result), step=step)
    mlflow.set_tag("drift.fired", ",".join(result.fired) or "none")
    for path in files:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def textfile_path(directory: str | Path, workspace: str | Path) -> Path:
    """``metarec_drift_<hash of the workspace>.prom``: one file per workspace, so several can share a host."""
    digest = hashlib.sha256(str(Path(workspace).resolve()).encode()).hexdigest()[:12]
    return Path(directory) / f"metarec_drift_{digest}.prom"


def write_textfile(
    payload: Mapping[str, Any],
    directory: str | Path | None = None,
    now: float | None = None,
) -> Path | None:
    """Publish one drift check's verdict for node_exporter's textfile collector.

    Writes, labelled with the workspace (and the champion on the verdict)::

        metarec_drift_detected{workspace,champion} 0|1
        metarec_drift_check_fired{workspace,check} 0|1          (one per check)
        metarec_drift_window_events{workspace} <events in the window>
        metarec_drift_last_check_timestamp_seconds{workspace} <when this check ran>

    The file is written to a temporary name and renamed, so the collector never reads half of it; it
    is replaced by the next check, so the values always describe the latest one.

    Args:
        payload: The check's ``drift_payload`` (``workspace``, ``champion``, ``fired``, ``statistics``,
            ``n_events``).
        directory: The collector's directory; default ``$METAREC_DRIFT_TEXTFILE_DIR``. Nothing is written
            when neither is set.
        now: The check's time (epoch seconds); default now.

    Returns:
        The file written, or None when no directory is configured.

    Raises:
        OSError: The directory is missing or not writable.
    """
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    target = directory if directory is not None else os.environ.get(TEXTFILE_DIR_ENV, "")
    if not str(target).strip():
        return None
    workspace = str(payload["workspace"])
    fired = set(payload.get("fired") or [])
    checks = sorted(set(payload.get("statistics") or {}) | fired)
    registry = CollectorRegistry()
    detected = Gauge(
        TEXTFILE_METRICS[0],
        "1 when the last drift check of the workspace's champion fired, else 0.",
        ["workspace", "champion"],
        registry=registry,
    )
    detected.labels(workspace=workspace, champion=str(payload.get("champion") or "")).set(1 if fired else 0)
    per_check = Gauge(
        TEXTFILE_METRICS[1],
        "1 for each check that fired in the last drift check, 0 for the others.",
        ["workspace", "check"],
        registry=registry,
    )
    for check in checks:
        per_check.labels(workspace=workspace, check=check).set(1 if check in fired else 0)
    Gauge(
        TEXTFILE_METRICS[2],
        "Feedback events in the last drift check's window.",
        ["workspace"],
        registry=registry,
    ).labels(workspace=workspace).set(float(payload.get("n_events") or 0))
    Gauge(
        TEXTFILE_METRICS[3],
        "When the last drift check ran (seconds since the epoch); the stale-check alert watches it.",
        ["workspace"],
        registry=registry,
    ).labels(workspace=workspace).set(time.time() if now is None else now)
    path = textfile_path(target, workspace)
    # Temporary sibling (not *.prom, so the collector skips it) renamed over the file: atomic.
    write_to_textfile(str(path), registry)
    return path
