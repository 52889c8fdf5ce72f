"""Temporal replay: train on the past, then play the future through the real serving API.

The dataset's interactions are sorted by time and cut: the first ``train_fraction`` becomes data
version ``v0`` (what the first model is trained on), the following ones (``replay_fraction`` of the
rest) are cut into ``windows`` consecutive windows of equal size. Each window is played through
``metarec serve`` exactly as a client would:

1. for each user active in the window (in order of their first rating): ``GET
   /recommendations/{user}?k=10``; a user the served model does not know gets ``POST
   /recommendations`` with their profile (the dataset's ``.user`` row) and the items they rated in
   earlier windows as history;
2. ``POST /feedback`` with the list's impressions (``model_version``, ``request_id``, ``position``,
   stamped at the window's start), the user's real ratings of the window as ``rating`` events (their
   real timestamps) and a ``click`` for each rated item that was in the served list.

The client's hit rate (lists whose user rated at least one of the ten items in the window) is the
online quality of the model that served the window. The run's own steps (v0, window records, the
report and its MLflow runs) are here too; ``flows/replay.py`` wires them with the training and monitor
flows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import pipeline
from components.core import secrets
from components.core.config import Config
from components.data import fetch
from components.drift.reference import feedback_url
from components.retrain import FEEDBACK_DATA, DataVersions, format_number, read_inter, register_base

API_KEY_ENV = "METAREC_API_KEY"
MAX_BATCH = 1000


@dataclass
class ReplayPlan:
    """The cut: the base part's rows and each window's rows (``user_id, item_id, rating, timestamp``)."""

    header: list[str]
    base: pd.DataFrame
    windows: list[pd.DataFrame]

    @property
    def cut_ts(self) -> float:
        """Timestamp of the base part's last interaction."""
        return float(self.base["timestamp"].max())

    def summary(self) -> list[dict[str, Any]]:
        """Per window: rows, users, time span and how many users the base part has not seen."""
        seen = set(self.base["user_id"])
        out = []
        for w, frame in enumerate(self.windows):
            users = set(frame["user_id"])
            out.append(
                {
                    "window": w,
                    "rows": len(frame),
                    "users": len(users),
                    "users_new_to_base": len(users - seen),
                    "start": float(frame["timestamp"].min()),
                    "end": float(frame["timestamp"].max()),
                }
            )
        return out


def read_interactions(path: Path) -> tuple[list[str], pd.DataFrame]:
    """An ``.inter`` file as its header and a frame with plain column names (ids as text)."""
    header, frame = read_inter(path)
    frame.columns = [h.partition(":")[0] for h in header]
    missing = {"user_id", "item_id", "timestamp"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: a replay needs {sorted(missing)} in the .inter file")
    frame["timestamp"] = frame["timestamp"].astype(float)
    if "rating" in frame:
        frame["rating"] = frame["rating"].astype(float)
    else:
        frame["rating"] = 1.0
    return header, frame


def temporal_cut(
    header: list[str],
    frame: pd.DataFrame,
    train_fraction: float,
    windows: int,
    replay_fraction: float = 1.0,
) -> ReplayPlan:
    """Cut interactions by global time into a base part and ``windows`` equal consecutive windows."""
    if not 0 < train_fraction < 1:
        raise ValueError("train_fraction must be in (0, 1)")
    if windows < 1:
        raise ValueError("windows must be >= 1")
    if not 0 < replay_fraction <= 1:
        raise ValueError("replay_fraction must be in (0, 1]")
    ordered = frame.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    n_base = int(len(ordered) * train_fraction)
    rest = ordered.iloc[n_base:]
    rest = rest.iloc[: int(len(rest) * replay_fraction)]
    size = len(rest) // windows
    if size < 1:
        raise ValueError(f"{len(rest)} interactions after the cut cannot fill {windows} windows")
    parts = [rest.iloc[w * size : (w + 1) * size].reset_index(drop=True) for w in range(windows)]
    return ReplayPlan(header, ordered.iloc[:n_base].reset_index(drop=True), parts)


def write_inter(path: Path, header: list[str], frame: pd.DataFrame) -> None:
    """Write rows with the original header's columns and types."""
    names = [h.partition(":")[0] for h in header]
    kinds = {h.partition(":")[0]: h.partition(":")[2] for h in header}
    lines = ["\t".join(header)]
    columns = [frame[n].tolist() for n in names]
    for row in zip(*columns, strict=True):
        cells = [
            format_number(float(v)) if kinds[n] == "float" else str(v)
            for n, v in zip(names, row, strict=True)
        ]
        lines.append("\t".join(cells))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A ``metarec serve`` subprocess on a free loopback port."""

    workspace: Path
    feedback_url: str
    api_key: str
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait until ``/ready`` answers 200."""
        import httpx

        self.port = self.port or free_port()
        # Secrets travel in the environment, never on the command line (`ps` shows that to everyone).
        env = {**os.environ, API_KEY_ENV: self.api_key, secrets.FEEDBACK_URL_ENV: self.feedback_url}
        env.pop("METAREC_API_KEY_FILE", None)
        env.pop(secrets.FEEDBACK_URL_ENV + "_FILE", None)
        metarec = Path(sys.executable).parent / "metarec"
        cmd = [
            str(metarec) if metarec.exists() else sys.executable,
            *([] if metarec.exists() else ["-m", "metarec"]),
            "serve",
            "--workspace",
            str(self.workspace),
            "--port",
            str(self.port),
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"metarec serve exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"metarec serve not ready after {timeout:.0f}s; see {self.log_path}")

    def serving(self) -> str | None:
        """The model version ``/ready`` reports."""
        import httpx

        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = httpx.get(f"{self.url}/ready", timeout=2)
            if answer.status_code == 200:
                return str(answer.json().get("model_version"))
        return None

    def wait_for_version(self, version: str, timeout: float = 180.0) -> float:
        """Wait until the server hot-swapped to ``version``; return the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.serving() == str(version):
                return time.monotonic() - start
            time.sleep(0.25)
        raise TimeoutError(
            f"server still serves {self.serving()} {timeout:.0f}s after v{version} became champion"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(
    workspace: Path, feedback_url: str, api_key: str, log_path: Path
) -> Iterator[ServerProcess]:
    """A started server, stopped on exit."""
    server = ServerProcess(Path(workspace), feedback_url, api_key, log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- the client -----------------------------------------------------------------------------------


@dataclass
class WindowStats:
    """What one window's replay measured on the client side."""

    window: int
    lists: int = 0
    hits: int = 0
    impressions: int = 0
    clicks: int = 0
    ratings: int = 0
    cold_requests: int = 0
    skipped_users: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Share of served lists with at least one item the user rated in the window."""
        return self.hits / self.lists if self.lists else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "window": self.window,
            "lists": self.lists,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ratings": self.ratings,
            "ctr": self.clicks / self.impressions if self.impressions else float("nan"),
            "cold_requests": self.cold_requests,
            "skipped_users": self.skipped_users,
            "versions": dict(self.versions),
            "seconds": self.seconds,
        }


class ReplayClient:
    """Plays windows through the serving API, remembering each user's earlier ratings (client state)."""

    def __init__(self, base_url: str, api_key: str, profiles: dict[str, dict[str, str]], k: int = 10) -> None:
        import httpx

        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=60)
        self.profiles = profiles
        self.k = k
        self.history: dict[str, list[str]] = {}

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def recommend(self, user: str) -> tuple[dict[str, Any] | None, bool]:
        """The served list for ``user`` (None when it cannot be ranked) and whether it was a cold request."""
        answer = self.http.get(f"/recommendations/{user}", params={"k": self.k, "explain": "false"})
        if answer.status_code == 200:
            return answer.json(), False
        if answer.status_code != 404:
            answer.raise_for_status()
        body: dict[str, Any] = {"user_id": user, "k": self.k, "explain": False}
        profile = {k: v for k, v in self.profiles.get(user, {}).items() if v}
        history = self.history.get(user, [])[-1000:]
        if profile:
            body["profile"] = profile
        if history:
            body["history"] = history
        if "profile" not in body and "history" not in body:
            return None, True
        answer = self.http.post("/recommendations", json=body)
        if answer.status_code == 422 and history:
            # Items this model version does not know: ask again without them.
            body.pop("history")
            answer = self.http.post("/recommendations", json=body)
        answer.raise_for_status()
        return answer.json(), True

    def post(self, events: list[dict[str, Any]]) -> None:
        """POST events in batches of at most 1000."""
        for start in range(0, len(events), MAX_BATCH):
            answer = self.http.post("/feedback", json={"events": events[start : start + MAX_BATCH]})
            answer.raise_for_status()

    def play(self, window: int, frame: pd.DataFrame, arm: str) -> WindowStats:
        """Replay one window: a list per active user, then its impressions, ratings and clicks."""
        began = time.monotonic()
        stats = WindowStats(window)
        served_at = float(frame["timestamp"].min())
        order = frame.groupby("user_id", sort=False)["timestamp"].min().sort_values(kind="stable").index
        by_user = {u: g for u, g in frame.groupby("user_id", sort=False)}
        for user in order:
            rows = by_user[user].sort_values("timestamp", kind="stable")
            answer, cold = self.recommend(str(user))
            stats.cold_requests += int(cold)
            events: list[dict[str, Any]] = []
            shown: set[str] = set()
            request_id = None
            if answer is None:
                stats.skipped_users += 1
            else:
                version = str(answer["model_version"])
                request_id = answer["request_id"]
                stats.versions[version] += 1
                for item in answer["items"]:
                    shown.add(str(item["item_id"]))
                    events.append(
                        {
                            "event_id": f"{arm}:w{window}:{user}:{item['item_id']}:impression",
                            "type": "impression",
                            "user_id": str(user),
                            "item_id": str(item["item_id"]),
                            "model_version": version,
                            "request_id": request_id,
                            "position": int(item["rank"]),
                            "ts": served_at,
                        }
                    )
                stats.lists += 1
                stats.impressions += len(answer["items"])
            hit = False
            for item, rating, ts in zip(rows["item_id"], rows["rating"], rows["timestamp"], strict=True):
                events.append(
                    {
                        "event_id": f"{arm}:w{window}:{user}:{item}:rating",
                        "type": "rating",
                        "user_id": str(user),
                        "item_id": str(item),
                        "value": float(rating),
                        "ts": float(ts),
                    }
                )
                stats.ratings += 1
                if str(item) in shown:
                    hit = True
                    stats.clicks += 1
                    events.append(
                        {
                            "event_id": f"{arm}:w{window}:{user}:{item}:click",
                            "type": "click",
                            "user_id": str(user),
                            "item_id": str(item),
                            "request_id": request_id,
                            "ts": float(ts),
                        }
                    )
            stats.hits += int(hit and answer is not None)
            self.post(events)
            history = self.history.setdefault(str(user), [])
            history.extend(i for i in map(str, rows["item_id"]) if i not in history)
        stats.seconds = time.monotonic() - began
        return stats


def read_profiles(path: Path) -> dict[str, dict[str, str]]:
    """``.user`` rows as profiles the API accepts (age, gender, occupation, zip_code)."""
    if not path.exists():
        return {}
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame.columns = [c.partition(":")[0] for c in frame.columns]
    keep = [c for c in ("age", "gender", "occupation", "zip_code") if c in frame.columns]
    return {str(r["user_id"]): {k: str(r[k]) for k in keep} for r in frame.to_dict("records")}


# ---- the plot -------------------------------------------------------------------------------------

DRIFT_LINES = (
    ("item_popularity", "item PSI"),
    ("user_activity", "user PSI"),
    ("unseen_items", "unseen items share"),
    ("unseen_users", "unseen users share"),
    ("genre_mix", "genre Cramér's V"),
)


def plot_replay(arms: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Drift statistics (relative to their thresholds), online hit rate and the serving version per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    styles = {"static": "--", "retrain": "-"}
    for arm, rows in arms.items():
        xs = [r["window"] for r in rows]
        for check, label in DRIFT_LINES:
            ys = []
            for r in rows:
                stat = (r.get("drift") or {}).get("statistics", {}).get(check, {})
                value, thr = stat.get("value"), stat.get("threshold")
                ys.append(value / thr if value is not None and thr else np.nan)
            axes[0].plot(xs, ys, styles.get(arm, "-"), marker="o", label=f"{arm}: {label}")
        axes[1].plot(xs, [r["client"]["hit_rate"] for r in rows], styles.get(arm, "-"), marker="o", label=arm)
        served = [
            float(max(r["client"]["versions"], key=r["client"]["versions"].get, default="nan")) for r in rows
        ]
        axes[2].step(xs, served, where="mid", label=arm, linestyle=styles.get(arm, "-"))
        fired = [r["window"] for r in rows if (r.get("drift") or {}).get("drifted")]
        axes[0].scatter(fired, [0] * len(fired), marker="v", s=60, label=f"{arm}: drift fired")
    axes[0].axhline(1.0, color="#e63946", lw=1)
    axes[0].set(ylabel="statistic / threshold", title="drift statistics per window (>1 fires)")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set(ylabel="online hit@10", title="online hit rate of the served lists")
    axes[1].legend()
    axes[2].set(ylabel="model version", xlabel="window", title="model version serving the window")
    axes[2].legend()
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the run: preparation, window records, report (``flows/replay.py`` wires them) ---------------

ARMS = ("static", "retrain")
STATIC_STORE = "feedback/replay-static.db"


def prepare(
    ws: Path, windows: int, train_fraction: float, replay_fraction: float, overrides: list[str]
) -> tuple[ReplayPlan, Config]:
    """Fetch the dataset, cut it, write and ``dvc add`` v0, and return the plan and config."""
    cfg = pipeline.prepare_workspace(ws, overrides)
    name = cfg.data.name
    source = ws / "data" / "replay" / "source"
    if not fetch.dataset_files(source, name):
        fetch.fetch(source, cfg.data.path, name)
    header, frame = read_interactions(source / f"{name}.inter")
    plan = temporal_cut(header, frame, train_fraction, windows, replay_fraction)
    rel = FEEDBACK_DATA / "v0"
    dest = ws / rel
    dest.mkdir(parents=True, exist_ok=True)
    for path in fetch.dataset_files(source, name):
        if path.name != f"{name}.inter":
            shutil.copyfile(path, dest / path.name)
    write_inter(dest / f"{name}.inter", header, plan.base)
    url = feedback_url(ws, cfg)
    with DataVersions(ws).locked() as versions:
        register_base(
            versions, rel, name, url, f"replay: first {train_fraction:.0%} of {name} by global time"
        )
    return plan, cfg


def arm_store(ws: Path, cfg: Config, arm: str, trigger: str) -> tuple[str, str]:
    """An arm's feedback store and monitor trigger: ``static`` only reports, into a store of its own."""
    if arm == "static":
        return f"sqlite:///{ws / STATIC_STORE}", "none"
    return feedback_url(ws, cfg), trigger


def window_row(
    window: int, serving: str | None, stats: WindowStats, checked: dict[str, Any]
) -> dict[str, Any]:
    """One window's record: the version that served it, the client's numbers, the monitor's verdict."""
    return {
        "window": window,
        "serving_version": serving,
        "client": stats.to_dict(),
        "drift": {k: checked[k] for k in ("drifted", "fired", "statistics", "metrics", "champion")},
        "monitor_run_id": checked["mlflow_run_id"],
        "retrain": None,
    }


def wait_for_window(ws: Path, window: str, timeout: float) -> dict[str, Any]:
    """Wait until the retrain flow recorded ``window`` as done (event-triggered retraining)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        record = DataVersions(ws).window(window)
        if record is not None and record.get("status") == "done":
            return dict(record["result"])
        time.sleep(2)
    raise TimeoutError(f"no retrain run finished window {window} within {timeout:.0f}s")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def log_to_mlflow(
    ws: Path, cfg: Config, params: dict[str, Any], arms: dict[str, list[dict[str, Any]]], out: Path
) -> str:
    """One MLflow run per arm (per-window metrics) under a parent run with the plot and summary."""
    import mlflow

    from components.core import tracking

    experiment_id = tracking.setup(ws, cfg.tracking.experiment + "-replay", cfg.tracking.uri)
    plot = plot_replay(arms, out / "replay.png")
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="replay", tags={"metarec.flow": "replay"}
    ) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for arm, rows in arms.items():
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"replay {arm}", nested=True, tags={"metarec.arm": arm}
            ):
                for r in rows:
                    step = int(r["window"])
                    client = r["client"]
                    metrics = {
                        "online_hit_at_10": client["hit_rate"],
                        "online_ctr": client["ctr"],
                        "lists": client["lists"],
                        "cold_requests": client["cold_requests"],
                        "model_version": float(r["serving_version"]),
                        "retrained": float(bool(r.get("retrain"))),
                        "promoted": float(bool((r.get("retrain") or {}).get("registry", {}).get("promoted"))),
                    }
                    metrics.update((r.get("drift") or {}).get("metrics", {}))
                    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _finite(v)}, step=step)
                totals = summary(rows)
                mlflow.log_metrics({k: v for k, v in totals.items() if _finite(v)})
        for arm, rows in arms.items():
            mlflow.log_metrics({f"{arm}.{k}": v for k, v in summary(rows).items() if _finite(v)})
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out / "replay.json"))
        mlflow.log_artifact(str(out / "replay.md"))
        return str(parent.info.run_id)


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """An arm's hit rates, drifted windows, retrains and promotions over all its windows."""
    lists = sum(r["client"]["lists"] for r in rows)
    hits = sum(r["client"]["hits"] for r in rows)
    later = [r for r in rows if r["window"] > 0]
    later_lists = sum(r["client"]["lists"] for r in later)
    return {
        "hit_rate_all": hits / lists if lists else float("nan"),
        "hit_rate_after_first": (sum(r["client"]["hits"] for r in later) / later_lists)
        if later_lists
        else float("nan"),
        "windows_drifted": float(sum(bool((r.get("drift") or {}).get("drifted")) for r in rows)),
        "retrains": float(sum(bool(r.get("retrain")) for r in rows)),
        "promotions": float(
            sum(bool((r.get("retrain") or {}).get("registry", {}).get("promoted")) for r in rows)
        ),
    }


def markdown(
    params: dict[str, Any], plan: list[dict[str, Any]], arms: dict[str, list[dict[str, Any]]]
) -> str:
    """``replay.md``: the parameters, the plan, every arm's windows and their summaries."""
    lines = ["# Replay", "", "```", json.dumps(params, indent=1, default=str), "```", ""]
    lines += ["| window | rows | users | users new to v0 |", "|---|---|---|---|"]
    lines += [f"| {p['window']} | {p['rows']} | {p['users']} | {p['users_new_to_base']} |" for p in plan]
    lines += ["", "| arm | window | served by | lists | online hit@10 | CTR | drift fired | retrain → gate |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for arm, rows in arms.items():
        for r in rows:
            fired = ", ".join((r.get("drift") or {}).get("fired", [])) or "—"
            rt = r.get("retrain")
            if rt:
                reg = rt.get("registry", {})
                gate = f"v{reg.get('version')} {'promoted' if reg.get('promoted') else 'refused'}"
            else:
                gate = "—"
            c = r["client"]
            lines.append(
                f"| {arm} | {r['window']} | v{r['serving_version']} | {c['lists']} | {c['hit_rate']:.4f} | "
                f"{c['ctr']:.4f} | {fired} | {gate} |"
            )
    lines += ["", "| arm | hit@10 all windows | hit@10 after window 0 | retrains | promotions |"]
    lines += ["|---|---|---|---|---|"]
    for arm, rows in arms.items():
        s = summary(rows)
        lines.append(
            f"| {arm} | {s['hit_rate_all']:.4f} | {s['hit_rate_after_first']:.4f} | {s['retrains']:.0f} | "
            f"{s['promotions']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def report(
    ws: Path, cfg: Config, params: dict[str, Any], plan: ReplayPlan, arms: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Write ``replay/replay.json`` and ``replay.md``, log both arms to MLflow; return the JSON's content
    with the MLflow run id and the report's path."""
    out = ws / "replay"
    summaries = {arm: summary(rows) for arm, rows in arms.items()}
    payload = {"params": params, "plan": plan.summary(), "arms": arms, "summary": summaries}
    (out / "replay.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    (out / "replay.md").write_text(markdown(params, plan.summary(), arms), encoding="utf-8")
    run_id = log_to_mlflow(ws, cfg, params, arms, out)
    return {**payload, "mlflow_run_id": run_id, "report": str(out / "replay.md")}
