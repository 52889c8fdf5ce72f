"""Retraining on feedback: data versions built from the feedback store, and the gate on new data.

Data versions live under ``<workspace>/data/feedback/``:

* ``v0/`` is a copy of the dataset the workspace was trained on before the first retrain.
* ``v<N>/`` is a full copy of ``v<N-1>`` whose ``<name>.inter`` has the new feedback appended:
  clicks and ratings (``retrain.event_types``) with store sequence above ``v<N-1>``'s high-water
  mark, one row per new (user, item) pair. Every version is ``dvc add``-ed, so its content sits in
  the workspace's DVC cache with a ``v<N>.dvc`` pointer and no version is ever overwritten.
* ``versions.json`` records each version (path, parent, feedback high-water mark, counts, DVC hash)
  and each retraining window (which data version it made, its status and its result), which is
  what makes a second trigger for the same window return the first one's result.

New data changes the evaluation split, and the registry's gate refuses to compare metrics measured
on different data. :func:`reevaluate_champion` scores the champion's bundle (as it serves, with its
own frozen history) on the challenger's test split with the offline protocol, so the gate can compare
the two on the same users and items (:func:`register_and_gate_new_data`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import fetch
from components.storage import atomic_dir, read_json, write_json
from metarec.config import Config, RetrainConfig

FEEDBACK_DATA = Path("data") / "feedback"
VERSIONS_FILE = "versions.json"
LOCK_FILE = "retrain.lock"


class RetrainError(RuntimeError):
    """A data version that cannot be made as asked; nothing was recorded."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class DataVersion:
    """One immutable dataset version under ``data/feedback``."""

    version: int
    path: str  # relative to the workspace
    name: str
    parent: int | None
    feedback_url: str
    # Store sequence of the last feedback event this version contains (its high-water mark).
    feedback_seq: int
    n_interactions: int
    n_appended: int
    max_ts: float | None
    created: str
    source: str = ""
    window: str = ""
    dvc_md5: str = ""


class DataVersions:
    """``versions.json`` of a workspace: the data versions and the retraining windows."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace).resolve()
        self.root = self.workspace / FEEDBACK_DATA
        self.file = self.root / VERSIONS_FILE
        self._data: dict[str, Any] = {"versions": [], "windows": {}}
        if self.file.exists():
            self._data = read_json(self.file)
            self._data.setdefault("versions", [])
            self._data.setdefault("windows", {})

    @contextlib.contextmanager
    def locked(self, timeout: float = -1) -> Iterator[DataVersions]:
        """Hold the workspace's retrain lock (one retrain at a time) and re-read the file under it."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / LOCK_FILE), timeout=timeout):
            yield DataVersions(self.workspace)

    def save(self) -> None:
        """Write ``versions.json`` atomically."""
        write_json(self.file, self._data)

    @property
    def registry_paused(self) -> bool:
        """Whether a retrain turned ``registry.enabled`` off for its training run and not back on yet."""
        return bool(self._data.get("registry_paused", False))

    @registry_paused.setter
    def registry_paused(self, value: bool) -> None:
        self._data["registry_paused"] = bool(value)

    @property
    def versions(self) -> list[DataVersion]:
        """Every data version, oldest first."""
        return [DataVersion(**v) for v in self._data["versions"]]

    def latest(self) -> DataVersion | None:
        """The newest data version, if any."""
        versions = self.versions
        return versions[-1] if versions else None

    def add(self, version: DataVersion) -> None:
        """Record a new data version (in memory; call :meth:`save`)."""
        self._data["versions"].append(asdict(version))

    def by_path(self, path: str | Path | None) -> DataVersion | None:
        """The data version whose directory is ``path`` (absolute or workspace-relative)."""
        if not path:
            return None
        target = Path(path)
        target = (target if target.is_absolute() else self.workspace / target).resolve()
        for v in self.versions:
            if (self.workspace / v.path).resolve() == target:
                return v
        return None

    def window(self, window: str) -> dict[str, Any] | None:
        """What retraining recorded for ``window``."""
        found = self._data["windows"].get(window)
        return dict(found) if found is not None else None

    def set_window(self, window: str, **record: Any) -> None:
        """Record (or update) a window (in memory; call :meth:`save`)."""
        entry = self._data["windows"].setdefault(window, {})
        entry.update(record, updated=_now())

    def to_dict(self) -> dict[str, Any]:
        """The whole file's content."""
        return json.loads(json.dumps(self._data))


def _dvc_add(workspace: Path, rel: Path) -> str:
    """``dvc add`` a directory inside the workspace; return the DVC hash of its content."""
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "-q", str(rel)],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RetrainError(f"dvc add {rel} failed in {workspace}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    import yaml

    pointer = yaml.safe_load((workspace / rel.parent / f"{rel.name}.dvc").read_text(encoding="utf-8"))
    outs = pointer.get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def read_inter(path: Path) -> tuple[list[str], pd.DataFrame]:
    """A RecBole ``.inter`` file's header fields (``name:type``) and rows (all columns as text)."""
    header = path.read_text(encoding="utf-8").split("\n", 1)[0].rstrip("\r").split("\t")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    return header, frame


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def new_interactions(
    events: pd.DataFrame,
    existing: set[tuple[str, str]],
    cfg: RetrainConfig,
    known_users: set[str] | None = None,
    known_items: set[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Turn feedback events into one new interaction per (user, item) pair not already in the data.

    A pair's rating is its latest rating event's value, or ``cfg.click_rating`` when it was only
    clicked; its timestamp is its first event's. Events are deduplicated by ``event_id`` first.
    Users or items missing from the dataset's ``.user``/``.item`` tables are skipped (the ingest stage
    would refuse them: a new user's profile has to enter the dataset through its own process).

    Returns:
        ``[user_id, item_id, rating, timestamp]`` rows and counts of what was dropped and why.
    """
    counts = {"events": int(len(events))}
    ev = events[events["type"].isin(cfg.event_types)].drop_duplicates("event_id")
    counts["feedback_events"] = int(len(ev))
    bad = ev["user_id"].str.contains(r"\s", regex=True) | ev["item_id"].str.contains(r"\s", regex=True)
    counts["skipped_whitespace_ids"] = int(bad.sum())
    ev = ev[~bad]
    if known_users is not None:
        unknown = ~ev["user_id"].isin(known_users)
        counts["skipped_unknown_users"] = int(unknown.sum())
        ev = ev[~unknown]
    if known_items is not None:
        unknown = ~ev["item_id"].isin(known_items)
        counts["skipped_unknown_items"] = int(unknown.sum())
        ev = ev[~unknown]
    columns = ["user_id", "item_id", "rating", "timestamp"]
    if ev.empty:
        counts.update(already_in_data=0, new_interactions=0)
        return pd.DataFrame(columns=columns), counts
    ev = ev.sort_values(["ts", "event_id"], kind="stable")
    first = ev.groupby(["user_id", "item_id"], sort=False)["ts"].min()
    ratings = ev[ev["type"] == "rating"].groupby(["user_id", "item_id"], sort=False)["value"].last()
    rows = first.rename("timestamp").to_frame().join(ratings.rename("rating"))
    rows["rating"] = rows["rating"].fillna(cfg.click_rating)
    rows = rows.reset_index()
    in_data = np.fromiter(
        ((u, i) in existing for u, i in zip(rows["user_id"], rows["item_id"], strict=True)),
        dtype=bool,
        count=len(rows),
    )
    counts["already_in_data"] = int(in_data.sum())
    rows = rows[~in_data].sort_values(["timestamp", "user_id", "item_id"], kind="stable")
    counts["new_interactions"] = int(len(rows))
    return rows[columns].reset_index(drop=True), counts


def _append_lines(header: list[str], rows: pd.DataFrame) -> list[str]:
    lines = []
    names = [h.partition(":")[0] for h in header]
    kinds = [h.partition(":")[2] for h in header]
    for name, kind in zip(names, kinds, strict=True):
        if name not in ("user_id", "item_id", "rating", "timestamp") and kind in ("float", "float_seq"):
            raise RetrainError(f".inter field {name!r} ({kind}) has no value in feedback; cannot append")
    for rec in rows.itertuples(index=False):
        values = []
        for name in names:
            if name == "user_id":
                values.append(str(rec.user_id))
            elif name == "item_id":
                values.append(str(rec.item_id))
            elif name == "rating":
                values.append(_fmt(float(rec.rating)))
            elif name == "timestamp":
                values.append(_fmt(float(rec.timestamp)))
            else:
                values.append("")
        lines.append("\t".join(values))
    return lines


def _ids(path: Path, column: str) -> set[str] | None:
    if not path.exists():
        return None
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    for col in frame.columns:
        if col.partition(":")[0] == column:
            return set(frame[col].astype(str))
    return None


def _inter_stats(path: Path) -> tuple[int, float | None, set[tuple[str, str]]]:
    header, frame = read_inter(path)
    names = {h.partition(":")[0]: h for h in header}
    pairs = set(zip(frame[names["user_id"]], frame[names["item_id"]], strict=True))
    max_ts = None
    if "timestamp" in names and len(frame):
        max_ts = float(pd.to_numeric(frame[names["timestamp"]], errors="coerce").max())
    return len(frame), max_ts, pairs


def ensure_base(versions: DataVersions, cfg: Config, url: str) -> DataVersion:
    """The newest data version; when there is none, ``v0``: a tracked copy of the configured dataset.

    Call under :meth:`DataVersions.locked`; saves ``versions.json`` when it adds ``v0``.
    """
    latest = versions.latest()
    if latest is not None:
        return latest
    name = cfg.data.name
    rel = FEEDBACK_DATA / "v0"
    dest = versions.workspace / rel
    with atomic_dir(dest) as tmp:
        result = fetch.fetch(tmp / "data", cfg.data.path, name)
        for path in sorted(result.directory.iterdir()):
            path.rename(tmp / path.name)
        (tmp / "data").rmdir()
    source = cfg.data.path or f"pypi:recbole=={fetch.RECBOLE_VERSION}"
    return register_base(versions, rel, name, url, source)


def register_base(versions: DataVersions, rel: Path, name: str, url: str, source: str) -> DataVersion:
    """Record the dataset written at ``rel`` (inside the workspace) as ``v0`` and ``dvc add`` it."""
    dest = versions.workspace / rel
    if (dest / f"{name}.train.inter").exists():
        raise RetrainError(
            f"dataset {name!r} is pre-split (.train/.valid/.test.inter); retraining appends feedback to a "
            "single .inter file"
        )
    if versions.versions:
        raise RetrainError(f"{versions.file} already has data versions; v0 is made once")
    n, max_ts, _ = _inter_stats(dest / f"{name}.inter")
    md5 = _dvc_add(versions.workspace, Path(rel))
    base = DataVersion(
        version=0,
        path=str(rel),
        name=name,
        parent=None,
        feedback_url=url,
        feedback_seq=0,
        n_interactions=n,
        n_appended=0,
        max_ts=max_ts,
        created=_now(),
        source=source,
        dvc_md5=md5,
    )
    versions.add(base)
    versions.save()
    return base


def feedback_after(previous: DataVersion, url: str) -> int:
    """Store sequence after which feedback is new to ``previous`` (0 when the store changed)."""
    return previous.feedback_seq if previous.feedback_url == url else 0


def append_version(
    versions: DataVersions,
    previous: DataVersion,
    events: pd.DataFrame,
    high_water: int,
    url: str,
    cfg: Config,
    window: str = "",
) -> tuple[DataVersion | None, dict[str, int]]:
    """Write ``v<N>``: ``previous`` plus the new interactions in ``events``; ``dvc add`` it.

    Returns:
        The new version (None when fewer than ``retrain.min_new_interactions`` rows were new; nothing
        is written then) and the counts of :func:`new_interactions`.
    """
    src = versions.workspace / previous.path
    name = previous.name
    inter = src / f"{name}.inter"
    _, max_ts, pairs = _inter_stats(inter)
    rows, counts = new_interactions(
        events,
        pairs,
        cfg.retrain,
        known_users=_ids(src / f"{name}.user", "user_id"),
        known_items=_ids(src / f"{name}.item", "item_id"),
    )
    if len(rows) < cfg.retrain.min_new_interactions:
        return None, counts
    number = max(v.version for v in versions.versions) + 1
    rel = FEEDBACK_DATA / f"v{number}"
    dest = versions.workspace / rel
    header, _ = read_inter(inter)
    with atomic_dir(dest) as tmp:
        for path in fetch.dataset_files(src, name):
            if path.name != inter.name:
                shutil.copyfile(path, tmp / path.name)
        text = inter.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text += "\n"
        with open(tmp / inter.name, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.write("\n".join(_append_lines(header, rows)) + "\n")
    md5 = _dvc_add(versions.workspace, rel)
    new_max = float(rows["timestamp"].max())
    version = DataVersion(
        version=number,
        path=str(rel),
        name=name,
        parent=previous.version,
        feedback_url=url,
        feedback_seq=high_water,
        n_interactions=previous.n_interactions + len(rows),
        n_appended=len(rows),
        max_ts=max(x for x in (max_ts, new_max) if x is not None and math.isfinite(x)),
        created=_now(),
        source=f"v{previous.version} + feedback",
        window=window,
        dvc_md5=md5,
    )
    versions.add(version)
    versions.save()
    return version, counts


# ---- the gate on new data --------------------------------------------------------------------------


def reevaluate_champion(engine: Any, workspace: Path, ks: list[int]) -> dict[str, float]:
    """Metrics of a serving engine on the workspace's test split, with the evaluate stage's protocol.

    Every user with test interactions gets a full ranking with their train and valid items excluded.
    A user the engine knows is ranked as served (its own frozen history); an unknown user from their
    profile and their train/valid items as history; items the engine does not know are never ranked.

    Returns:
        ``compute_metrics`` over the test users (``hit@k``, ``ndcg@k``, ..., ``n_users``).
    """
    from components.metrics import compute_metrics
    from components.split import load_split, to_matrix
    from components.stages import Paths

    paths = Paths(Path(workspace))
    users = pd.read_parquet(paths.processed / "users.parquet").sort_values("user")
    items = pd.read_parquet(paths.processed / "items.parquet").sort_values("item")
    split = load_split(paths.split)
    n_users, n_items = len(users), len(items)
    seen = (to_matrix(split.train, n_users, n_items) + to_matrix(split.valid, n_users, n_items)).tocsr()
    test = to_matrix(split.test, n_users, n_items)
    item_ids = items["item_id"].astype(str).tolist()
    index = {item: k for k, item in enumerate(item_ids)}
    user_ids = users["user_id"].astype(str).tolist()
    profile_cols = [c for c in ("age", "gender", "occupation", "zip_code") if c in users.columns]
    profiles = users[profile_cols].astype(str).to_dict("records") if profile_cols else [{}] * n_users
    known_items = set(engine.item_ids)
    k_max = min(max(ks), n_items)
    eval_users = np.flatnonzero(np.diff(test.indptr) > 0)
    topk = np.full((len(eval_users), max(ks)), -1, dtype=np.int64)
    for row, u in enumerate(eval_users):
        excluded = set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist())
        want = min(k_max + len(excluded), len(known_items))
        uid = user_ids[u]
        if engine.known_user(uid):
            recs = engine.recommend(uid, want, explain=False)
        else:
            history = [item_ids[i] for i in sorted(excluded) if item_ids[i] in known_items][-1000:]
            profile = {k: v for k, v in profiles[u].items() if v and v != "nan"}
            if not history and not profile:
                continue
            recs = engine.recommend(None, want, profile=profile or None, history=history, explain=False)
        ranked = [index[r["item_id"]] for r in recs if r["item_id"] in index]
        ranked = [i for i in ranked if i not in excluded][:k_max]
        topk[row, : len(ranked)] = ranked
    return compute_metrics(topk, test[eval_users], ks)


def trained_on(registry: Any, version: str) -> str | None:
    """The ``data.path`` the version's training run was configured with (None when unknown)."""
    mv = registry.version(version)
    if not mv.run_id:
        return None
    try:
        params = registry.client.get_run(mv.run_id).data.params
    except Exception:  # a deleted or foreign run: treat as unknown
        return None
    value = params.get("data.path")
    return None if value in (None, "null", "") else str(Path(value).resolve())


def register_and_gate_new_data(
    workspace: Path, cfg: Config, bundle: Path, run_id: str, data_path: Path
) -> dict[str, Any]:
    """Register a bundle trained on ``data_path`` as challenger and gate it against the champion.

    Which gate runs depends on the data the champion was trained on:

    * no champion, or the champion was trained on the same data version: the registry's own gate
      (``Registry.promote``), exactly as after ``metarec run``;
    * a different data version: the champion's warm metrics are re-measured on this workspace's test
      split (:func:`reevaluate_champion`, the split the challenger was evaluated on) and the gate
      compares the two there; its cold metric and latency are kept as registered (the cold-item
      protocol refits a model, which a frozen bundle cannot). A pass promotes through the registry's
      audited ``promote`` (``force``, past the stored fingerprints, with the re-evaluated decision
      as the recorded reason); a refusal leaves the version as challenger.

    The decision is kept on the version as ``metarec.gate`` (with ``"gate": "reevaluated"`` in the
    second case).

    Returns:
        ``{"version", "promoted", "champion", "reasons", "gate", "champion_reevaluated"?}``.
    """
    import tempfile

    from components.bundle import load_bundle
    from registry.gate import Candidate, GateDecision, evaluate_gate, metric
    from registry.store import CHAMPION, open_registry

    registry = open_registry(workspace, cfg)
    mv = registry.register(bundle, run_id)
    version = str(mv.version)
    champion = registry.aliases().get(CHAMPION)
    same = champion is not None and trained_on(registry, champion) == str(Path(data_path).resolve())
    out: dict[str, Any] = {"version": version}
    decision: GateDecision | None
    if champion is None or same:
        move = registry.promote(version, reason="passed the gate after retraining")
        decision = move.decision
        out.update(gate="registry", promoted=move.moved)
    else:
        challenger = registry.candidate(version)
        incumbent = registry.candidate(champion)
        with tempfile.TemporaryDirectory(prefix="metarec-regate-") as tmp:
            champion_bundle, _ = registry.download_bundle(champion, Path(tmp))
            engine = load_bundle(champion_bundle, version=champion)
            warm = reevaluate_champion(engine, workspace, cfg.eval.ks)
        section = cfg.registry.primary.partition(".")[0]
        rebased = Candidate(champion, {**incumbent.metrics, section: warm}, challenger.data_version)
        decision = evaluate_gate(challenger, rebased, cfg.registry)
        registered = metric(incumbent.metrics, cfg.registry.primary)
        reevaluated = metric(rebased.metrics, cfg.registry.primary)
        out.update(
            gate="reevaluated",
            promoted=False,
            champion_reevaluated={
                "version": champion,
                cfg.registry.primary: reevaluated,
                "registered": registered,
                "n_users": warm.get("n_users"),
            },
        )
        if decision.promote:
            new = metric(challenger.metrics, cfg.registry.primary)
            why = (
                f"retrain: passed the gate against champion v{champion} re-evaluated on this version's "
                f"evaluation data ({cfg.registry.primary} {_num(new)} > {_num(reevaluated)}; "
                f"v{champion} had {_num(registered)} on its own data)"
            )
            out["promoted"] = registry.promote(version, reason=why, force=True).moved
    tag = decision.to_dict() if decision is not None else {}
    tag.update({k: out[k] for k in ("gate", "champion_reevaluated") if k in out})
    registry.client.set_model_version_tag(
        registry.name, version, "metarec.gate", json.dumps(tag, sort_keys=True, default=str)
    )
    out["reasons"] = decision.reasons if decision is not None else []
    out["champion"] = registry.aliases().get(CHAMPION)
    return out
