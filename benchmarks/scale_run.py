"""The whole pipeline on the synthetic graphs (issue 17): time and peak memory of every stage, per size.

Usage:
    .venv/bin/python benchmarks/scale_run.py --size small            # generate, metarec run, serve
    .venv/bin/python benchmarks/scale_run.py --size medium -S eval.cold_fraction=0
    .venv/bin/python benchmarks/scale_run.py --size large --resume   # rerun what changed, keep the rest
    .venv/bin/python benchmarks/scale_run.py --report                # table + growth plot of the sizes run

Each size (``SIZES`` in components/data/synthetic.py: small 10k users x 2k items, medium 30k x 6k, large
100k x 20k) is generated once into ``<workdir>/data-<size>``, then ``metarec run`` trains on it from an
empty workspace ``<workdir>/ws-<size>`` in a child process: ingest through export, register and gate,
exactly as a user's run. The stage figures are the run's own (each stage's wall time and the peak RSS of
its process tree, as the training flow logs them to MLflow as ``stage.<name>.*``); this script adds the
whole run's wall and peak (which includes the local Prefect server when the run starts one) and, if the
run made a champion, ``metarec serve`` on it: seconds until
``/ready`` answers, the server's RSS, and 50 keep-alive GETs of one user's top-10 with explanations.

``--resume`` runs ``metarec run`` again in the size's existing workspace: DVC skips every stage whose
inputs, parameters and outputs are unchanged, and those keep the figures of the earlier record (marked
``earlier`` with its commit); the stages that run replace theirs. The whole run's wall and peak are then
those of the stages, summed and maximised, and say so (``whole`` in the record).

A stage that fails (out of memory, a wall) ends the run; the result records which stage and its error,
so a failed size is still a measurement. Results go to ``<workdir>/scale-<size>.json``; ``--report``
prints the markdown table for docs/benchmarks.md, writes the growth plot (``--plot``, default
docs/scale-growth.png) and logs one MLflow run per size plus the plot to the experiment
``metarec-scale`` (``--tracking-uri``; default a sqlite store in the workdir).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.core.processes import TreePeak, free_port, terminate_group, tree_rss  # noqa: E402
from components.data.synthetic import SIZES, generate  # noqa: E402
from components.stages import STAGES  # noqa: E402

METAREC = str(Path(sys.executable).with_name("metarec"))
# The training flow's line per stage (flows/training.py): "stage mine: ran in 12.3s, peak RSS 1,234 MB".
STAGE_DONE = re.compile(
    r"stage (\w+): (?:ran in|restored from the DVC run cache in) ([\d.]+)s(?:, peak RSS ([\d,]+) MB)?"
)
STAGE_START = re.compile(r"stage (\w+): running")
SPEC_FIELDS = ("n_users", "n_items", "n_entities", "n_interactions", "n_triples")


def stage_figures(log: str) -> tuple[list[dict[str, Any]], str | None]:
    """The stages a run's log says finished (seconds, peak MB), and the one running when it ended."""
    done, started = [], []
    for line in log.splitlines():
        if m := STAGE_DONE.search(line):
            peak = None if m.group(3) is None else float(m.group(3).replace(",", ""))
            restored = "restored" in m.group(0)
            done.append(
                {"stage": m.group(1), "seconds": float(m.group(2)), "peak_rss_mb": peak, "restored": restored}
            )
        elif m := STAGE_START.search(line):
            started.append(m.group(1))
    finished = {d["stage"] for d in done}
    unfinished = [s for s in started if s not in finished]
    return done, (unfinished[-1] if unfinished else None)


def git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def run_pipeline(size: str, workdir: Path, overrides: list[str], resume: bool = False) -> dict[str, Any]:
    """Generate the data (once) and ``metarec run`` a fresh workspace on it (``resume``: the existing one)."""
    spec = SIZES[size]
    data = workdir / f"data-{size}"
    if not (data / "synthetic.inter").exists():
        start = time.perf_counter()
        generate(spec, data)
        print(f"{size}: generated in {time.perf_counter() - start:.0f}s -> {data}", flush=True)
    ws = workdir / f"ws-{size}"
    if ws.exists() and not resume:
        raise SystemExit(f"{ws} exists: a scale run starts from an empty workspace (remove it first)")
    cmd = [METAREC, "run", "--workspace", str(ws), "-S", f"data.path={data}", "-S", "data.name=synthetic"]
    for item in overrides:
        cmd += ["-S", item]
    log_path = workdir / f"run-{size}.log"
    print(f"{size}: {' '.join(cmd)}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        with TreePeak(proc.pid, interval=0.5) as peak:
            returncode = proc.wait()
    wall = time.perf_counter() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    stages, failed = stage_figures(text)
    out: dict[str, Any] = {
        "size": size,
        "spec": {k: getattr(spec, k) for k in SPEC_FIELDS},
        "overrides": overrides,
        "returncode": returncode,
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": None if peak.peak_bytes is None else round(peak.peak_bytes / 2**20),
        "stages": stages,
        # A run can also fail outside any stage (configuration, the Prefect API, registration).
        "failed_stage": (failed or "(outside a stage)") if returncode else None,
        "error": _error_tail(text) if returncode else None,
        "registered": "registered version" in text,
        # Serving needs a champion; the first version can still fail the gate's absolute floors.
        "champion": "promoted to champion" in text,
        "cpus": os.cpu_count(),
        "commit": git_commit(),
        "whole": "one metarec run",
    }
    return out


def merge_resumed(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A resumed run's record: its stages, and the earlier record's for the stages DVC skipped.

    A kept stage names the commit that measured it (an earlier resume's own mark wins); the earlier
    serving figures are kept, marked, until this run makes a champion and serves it.
    """
    ran = {s["stage"] for s in now["stages"]}
    kept = [
        {**s, "earlier": s.get("earlier") or earlier.get("commit", "an earlier commit")}
        for s in earlier["stages"]
        if s["stage"] not in ran
    ]
    origins = sorted({s["earlier"] for s in kept})
    by_name = {s["stage"]: s for s in [*kept, *now["stages"]]}
    # In pipeline order: a stage new to this run (retune) goes where the DAG runs it, not last.
    rank = {name: i for i, name in enumerate(STAGES)}
    stages = sorted(by_name.values(), key=lambda s: rank.get(s["stage"], len(rank)))
    peaks = [s["peak_rss_mb"] for s in stages if s["peak_rss_mb"]]
    carried = {}
    if "serving" in earlier and "serving" not in now:
        carried = {
            "serving": {
                **earlier["serving"],
                "earlier": earlier["serving"].get("earlier", earlier.get("commit")),
            }
        }
    return (
        now
        | carried
        | {
            "stages": stages,
            "wall_seconds": round(sum(s["seconds"] for s in stages), 1),
            "peak_rss_mb": max(peaks) if peaks else None,
            "whole": f"stages summed: {len(kept)} kept from {', '.join(origins) or 'no earlier run'}, "
            f"the rest run at {now['commit']} ({now['wall_seconds']:.0f} s, peak {now['peak_rss_mb']} MB)",
        }
    )


def _error_tail(log: str, lines: int = 6) -> str:
    tail = [line for line in log.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(tail)


def measure_serving(ws: Path, requests: int = 50, ready_timeout: float = 900.0) -> dict[str, Any]:
    """``metarec serve`` on the workspace's champion: start-up, RSS, keep-alive latency of one user."""
    import pandas as pd

    user = quote(str(pd.read_parquet(ws / "data" / "processed" / "users.parquet").user_id.iloc[0]), safe="")
    port = free_port()
    if port is None:
        return {"error": "no free port on 127.0.0.1"}
    cmd = [METAREC, "serve", "--workspace", str(ws), "--port", str(port)]
    log = open(ws / "serve-scale.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        while True:
            if proc.poll() is not None:
                return {"error": f"metarec serve exited {proc.returncode} (see {log.name})"}
            if time.perf_counter() - start > ready_timeout:
                return {"error": f"not ready after {ready_timeout:.0f}s"}
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                probe.request("GET", "/ready")
                if probe.getresponse().status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            finally:
                probe.close()
            time.sleep(0.5)
        out["ready_seconds"] = round(time.perf_counter() - start, 1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # one keep-alive connection
        times = []
        try:
            for _ in range(requests):
                t0 = time.perf_counter()
                conn.request("GET", f"/recommendations/{user}?k=10")
                resp = conn.getresponse()
                resp.read()
                times.append((time.perf_counter() - t0) * 1000)
                if resp.status != 200:
                    return out | {"error": f"GET /recommendations/{user}: HTTP {resp.status}"}
        except (OSError, http.client.HTTPException) as err:
            return out | {"error": f"GET /recommendations/{user}: {err!r}"}
        finally:
            conn.close()
        # The first request ranks the user; the server remembers the list for the later ones.
        out["first_ms"] = round(times[0], 1)
        out["later_p50_ms"] = round(sorted(times[1:])[len(times[1:]) // 2], 2) if len(times) > 1 else None
        out["rss_mb"] = round((tree_rss(proc.pid) or 0) / 2**20)
        return out
    finally:
        terminate_group(proc.pid)
        log.close()


def report(workdir: Path, plot: Path, tracking_uri: str | None) -> None:
    """Print the table of every recorded size, draw the growth plot and log it all to MLflow."""
    results = [
        json.loads(p.read_text()) for p in sorted(workdir.glob("scale-*.json")) if ".earlier" not in p.name
    ]
    order = {name: i for i, name in enumerate(SIZES)}
    results.sort(key=lambda r: order.get(r["size"], 99))
    if not results:
        raise SystemExit(f"no scale-*.json in {workdir}: run a size first")
    stages = list(dict.fromkeys(s["stage"] for r in results for s in r["stages"]))
    head = "| stage | " + " | ".join(f"{r['size']} s | {r['size']} peak MB" for r in results) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(results))
    for stage in stages:
        cells = []
        for r in results:
            fig = next((s for s in r["stages"] if s["stage"] == stage), None)
            if fig is None:
                mark = "**failed**" if r.get("failed_stage") == stage else "—"
                cells += [mark, mark]
            else:
                peak = f"{fig['peak_rss_mb']:,.0f}" if fig["peak_rss_mb"] else "—"
                cells += [f"{fig['seconds']:.0f}", peak]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    cells = []
    for r in results:
        cells += [f"{r['wall_seconds']:.0f}", f"{r['peak_rss_mb']:,.0f}" if r["peak_rss_mb"] else "—"]
    print("| whole `metarec run` | " + " | ".join(cells) + " |")
    for r in results:
        if r.get("whole", "one metarec run") != "one metarec run":
            print(f"\n{r['size']}: whole = {r['whole']}")
        if r["returncode"]:
            print(f"\n{r['size']}: failed in {r['failed_stage']}:\n{r['error']}")
        elif not r["stages"]:
            print(f"\n{r['size']}: the run succeeded but its log has no stage lines (Prefect log level?)")
        if r.get("serving"):
            print(f"\n{r['size']} serving: {r['serving']}")
    _plot(results, stages, plot)
    print(f"\nplot: {plot}")
    uri = tracking_uri or f"sqlite:///{workdir.resolve() / 'scale-mlflow.db'}"
    _log_mlflow(results, plot, uri, (workdir.resolve() / "scale-artifacts").as_uri())


def _plot(results: list[dict[str, Any]], stages: list[str], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["spec"]["n_interactions"] / 1e6 for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in stages:
        secs, peaks = [], []
        for r in results:
            fig_ = next((s for s in r["stages"] if s["stage"] == stage), None)
            secs.append(None if fig_ is None else fig_["seconds"])
            peaks.append(None if fig_ is None or not fig_["peak_rss_mb"] else fig_["peak_rss_mb"] / 1024)
        pts = [(a, b) for a, b in zip(x, secs, strict=True) if b is not None]
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=stage)
        pts = [(a, b) for a, b in zip(x, peaks, strict=True) if b is not None]
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=stage)
    left.set(xlabel="interactions (millions)", ylabel="seconds", title="stage wall time", yscale="log")
    right.set(xlabel="interactions (millions)", ylabel="GiB", title="stage peak RSS (process tree)")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle("metarec run on the synthetic graphs (benchmarks/scale_run.py)", fontsize=10)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def _log_mlflow(results: list[dict[str, Any]], plot: Path, uri: str, artifacts: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("metarec-scale") is None:
        # A database store's artifacts would otherwise land in ./mlruns of whatever the cwd is.
        mlflow.create_experiment("metarec-scale", artifact_location=artifacts)
    mlflow.set_experiment("metarec-scale")
    # One run per size and report: a report after a new size adds a new set (the newest is complete).
    for r in results:
        with mlflow.start_run(run_name=f"scale-{r['size']}"):
            mlflow.log_params({**r["spec"], "overrides": " ".join(r["overrides"]) or "none"})
            mlflow.set_tag("metarec.failed_stage", r.get("failed_stage") or "none")
            metrics = {"wall_seconds": r["wall_seconds"]}
            if r["peak_rss_mb"]:
                metrics["peak_rss_mb"] = r["peak_rss_mb"]
            for s in r["stages"]:
                metrics[f"stage.{s['stage']}.seconds"] = s["seconds"]
                if s["peak_rss_mb"]:
                    metrics[f"stage.{s['stage']}.peak_rss_mb"] = s["peak_rss_mb"]
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(plot))
    print(f"MLflow: experiment metarec-scale at {uri}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES))
    parser.add_argument("--workdir", type=Path, default=ROOT / "scale-runs")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="a metarec run override")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving measurement")
    parser.add_argument("--resume", action="store_true", help="continue in the size's existing workspace")
    parser.add_argument("--report", action="store_true", help="table, plot and MLflow runs of recorded sizes")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale-growth.png")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.workdir, args.plot, args.tracking_uri)
        return
    if args.size is None:
        parser.error("--size or --report")
    dest = args.workdir / f"scale-{args.size}.json"
    result = run_pipeline(args.size, args.workdir, args.overrides, args.resume)
    if args.resume and dest.exists():
        earlier = json.loads(dest.read_text(encoding="utf-8"))
        dest.with_name(f"{dest.stem}.earlier.json").write_text(json.dumps(earlier, indent=2) + "\n")
        result = merge_resumed(earlier, result)
    dest.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")  # kept if serving fails
    if result["champion"] and not args.no_serve:
        result["serving"] = measure_serving(args.workdir / f"ws-{args.size}")
        dest.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
