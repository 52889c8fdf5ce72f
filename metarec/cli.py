"""The ``metarec`` command line: one command per job, every command scoped to a workspace."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from components.core.logs import DEBUG_ENV, State, log, log_to
from components.core.secrets import redact, redact_url
from components.stages import STAGES


class _Group(TyperGroup):
    """An unexpected exception prints one ``error:`` block; its traceback goes to the log (or --debug)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as exc:
            if State.debug:
                raise
            raise _fail(f"{type(exc).__name__}: {exc}", details=True) from None


app = typer.Typer(
    help="metarec: knowledge-graph metapath + language-model recommender pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
# Piped output (CI logs, make) gets a wide fixed width instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar=DEBUG_ENV, help="Show tracebacks and Prefect's failure logs on the console."
        ),
    ] = False,
) -> None:
    State.debug = debug
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the `metarec stage` processes DVC starts print theirs too
    log_to(None)  # until the command names its workspace (tests run many commands in one process)


WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace directory (default: $METAREC_WORKSPACE or ./workspace)."
    ),
]


def _workspace(value: Path | None) -> Path:
    from components.pipeline import default_workspace

    ws = value.resolve() if value is not None else default_workspace()
    log_to(ws)
    return ws


def _configured_uri(ws: Path) -> str:
    """The workspace's tracking server: ``METAREC_TRACKING_URI[_FILE]``, else ``tracking.uri`` ("": none)."""
    from components.core.tracking import configured_uri
    from components.core.workspace import workspace_config

    return configured_uri(workspace_config(ws, missing_ok=True).tracking.uri)


def _orchestrate() -> None:
    """Give the flows a Prefect API (the configured one, or metarec's local server) before Prefect loads."""
    from components.core.orchestration import OrchestrationError, ensure_api

    # The local Prefect server would try to send telemetry; this machine may have no route for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        ensure_api(progress=lambda line: err.print(line, highlight=False, markup=False))
    except OrchestrationError as exc:
        raise _fail(str(exc)) from None


def _fail(message: str, details: bool = False) -> typer.Exit:
    """Print one ``error:`` block and return the exit to raise.

    Called while handling an exception, it logs that exception's traceback (and a failed stage's DVC
    output) to the workspace log, or prints them with --debug; ``details`` points the user there.
    """
    # Errors may quote a database or tracking URL: never print (or log) its password.
    message = redact(message)
    exc = sys.exc_info()[1]
    stage_log = redact(str(getattr(exc, "log", "") or ""))
    if exc is not None:
        log.error("%s", message, exc_info=exc)
        if stage_log:
            log.error("output of the failed stage:\n%s", stage_log)
        if State.debug:
            print(redact("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
            if stage_log:
                print(stage_log, file=sys.stderr)
    else:
        log.error("%s", message)
    from components.pipeline import STAGE_ERROR_ENV

    report = os.environ.get(STAGE_ERROR_ENV)
    if report:
        # `metarec stage` under DVC: hand the message to the flow's PipelineError (components.pipeline).
        Path(report).write_text(message, encoding="utf-8")
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    if (details or stage_log) and not State.debug:
        where = State.log_file if State.log_file and State.log_file.exists() else None
        hint = f"details in {where} (or rerun with --debug)" if where else "rerun with --debug for details"
        err.print(f"  {hint}", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code=1)


def _known_errors() -> tuple[type[BaseException], ...]:
    from components.core.config import ConfigError
    from components.data.fetch import FetchError
    from components.data.ingest import IngestError
    from components.data.kg import GraphError
    from components.data.split import SplitError
    from components.evaluation.protocol import EvalData  # noqa: F401  (import check only)
    from components.pipeline import PipelineError

    return (
        ConfigError,
        FetchError,
        IngestError,
        GraphError,
        SplitError,
        PipelineError,
        ValueError,
        FileNotFoundError,
    )


def metrics_table(metrics: dict[str, dict[str, float]], title: str) -> Table:
    """Render metrics of each part (valid, test, mixed, cold) as columns, one row per metric."""
    table = Table(title=title)
    table.add_column("metric")
    parts = [p for p in ("valid", "test", "mixed", "cold") if p in metrics]
    for part in parts:
        table.add_column(part, justify="right")
    names = [k for k in metrics[parts[0]] if k != "n_users"] + ["n_users"]
    for name in names:
        row = [metrics[p].get(name) for p in parts]
        cells = ("—" if v is None else f"{v:.0f}" if name == "n_users" else f"{v:.4f}" for v in row)
        table.add_row(name, *cells)
    return table


@app.command()
def run(
    workspace: WorkspaceOpt = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-S", help="Override a parameter: key=value.")
    ] = None,
) -> None:
    """Run the training flow end to end; print the MLflow run id and a metrics table."""
    _orchestrate()
    from flows.training import training

    ws = _workspace(workspace)
    try:
        result = training(workspace=str(ws), overrides=list(set_ or []))
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    console.print(f"MLflow run id: [bold]{result['run_id']}[/]")
    ran = [s["stage"] for s in result["stages"] if s["ran"]]
    console.print(f"stages run: {', '.join(ran) or 'none (all up to date)'}")
    metrics = {k: v for k, v in result["metrics"].items() if k in ("valid", "test")}
    console.print(metrics_table(metrics, f"{result['metrics']['model']} — full ranking"))
    if "cold" in result["metrics"]:
        cold = {k: result["metrics"][k] for k in ("mixed", "cold")}
        title = "cold-item protocol: test, full ranking (mixed) and cold items only (cold)"
        console.print(metrics_table(cold, title))
    if "registry" in result:
        outcome = result["registry"]
        verdict = "promoted to champion" if outcome["promoted"] else "kept as challenger (gate refused)"
        console.print(f"registered model version {outcome['version']}: {verdict}")
    console.print(f"metrics written to {ws / 'metrics.json'}")


@app.command()
def ablate(
    workspace: WorkspaceOpt = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="Run only these variants (repeatable).")
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            min=1,
            help="Run every variant under this many seeds: the workspace's seed and the next ones. "
            "The seed sets the model's training and the cold-item draw; the table shows mean ± sd.",
        ),
    ] = 1,
    seed: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Run under exactly these seeds (repeatable; instead of --seeds)."),
    ] = None,
) -> None:
    """Fit and evaluate the ablation variants and baselines (needs a workspace after `metarec run`).

    Each (variant, seed): a warm fit, a cold-item refit, one MLflow run; a summary run holds mean ± sd.
    """
    from components import ablation

    try:
        ablation.select(variant)
        ablation.seed_list(0, seeds, seed)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _orchestrate()
    from flows.ablation import ablations

    ws = _workspace(workspace)
    try:
        result = ablations(
            workspace=str(ws),
            variants=list(variant or []) or None,
            n_seeds=seeds,
            seeds=list(seed or []) or None,
        )
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    console.print(result["table"])
    console.print(f"written to {ws / 'ablations.md'}; MLflow experiment {result['experiment']!r}")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=" | ".join(STAGES))],
    workspace: WorkspaceOpt = None,
) -> None:
    """Run one pipeline stage in a workspace (this is what dvc.yaml calls)."""
    from components.stages import run_stage

    try:
        if name == "mine":
            _orchestrate()  # mining runs as a Prefect flow
            from flows.mining import run_mining

            run_stage(name, _workspace(workspace), miner=run_mining)
        else:
            run_stage(name, _workspace(workspace))
    except _known_errors() as exc:
        raise _fail(str(exc)) from None


@app.command()
def recommend(
    workspace: WorkspaceOpt = None,
    all_users: Annotated[bool, typer.Option("--all-users", help="Recommend for every user.")] = False,
    user: Annotated[list[str] | None, typer.Option("--user", "-u", help="A user id (repeatable).")] = None,
    k: Annotated[int, typer.Option("--k", help="Items per user.")] = 10,
    out: Annotated[Path, typer.Option("--out", help="CSV file: user_id,item_id,rank,score.")] = Path(
        "recommendations.csv"
    ),
    explain: Annotated[
        bool, typer.Option("--explain", help="Add the top metapath instance per item (fusion model).")
    ] = False,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", help="Cold user: a profile field, e.g. age=25 (repeatable); prints JSON."),
    ] = None,
    history: Annotated[
        list[str] | None, typer.Option("--history", help="Cold user: an item id they interacted with.")
    ] = None,
    with_feedback: Annotated[
        bool,
        typer.Option(
            "--with-feedback",
            help="Add each user's clicks/ratings from the feedback store to their history, as "
            "`metarec serve` does (fusion model); users known only from feedback are listed too.",
        ),
    ] = False,
) -> None:
    """Write top-k recommendations from the last trained model, excluding items seen in train/valid.

    With --profile/--history it ranks for a user the model has never seen and prints JSON instead.
    """
    from components.bundle.offline import recommend as write_recommendations
    from components.bundle.offline import recommend_cold
    from components.core.workspace import Paths

    cold = bool(profile or history)
    if not cold and all_users == bool(user):
        raise _fail("give exactly one of --all-users or --user (or --profile/--history for a new user)")
    paths = Paths(_workspace(workspace))
    if not (paths.model / "model.json").exists():
        raise _fail(f"no trained model in {paths.model}; run `metarec run` first")
    if cold:
        fields = {}
        for entry in profile or []:
            key, sep, value = entry.partition("=")
            if not sep or not key:
                raise _fail(f"--profile expects key=value, got {entry!r}")
            fields[key.strip()] = value.strip()
        try:
            recs = recommend_cold(paths, k, fields, list(history or []))
        except _known_errors() as exc:
            raise _fail(str(exc)) from None
        console.print_json(json.dumps({"profile": fields, "history": list(history or []), "items": recs}))
        return
    try:
        feedback = _feedback_histories(paths.root) if with_feedback else None
        users = None if all_users else list(user or [])
        rows = write_recommendations(paths, k, out, users, explain=explain, feedback=feedback)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    console.print(f"wrote {rows} rows to {out}")


def _feedback_histories(ws: Path) -> dict[str, tuple[str, ...]]:
    """User id -> feedback items in the store ``metarec serve`` would use for this workspace, read now."""
    from components.core.workspace import workspace_config
    from components.drift.reference import feedback_url
    from components.serving.feedback import StoreUnavailableError, open_store
    from components.serving.online import overlay_from_store

    cfg = workspace_config(ws, missing_ok=True)
    if not cfg.serve.online_feedback:
        console.print(
            "note: serve.online_feedback is false, so `metarec serve` ranks without feedback; "
            "these lists include it"
        )
    url = feedback_url(ws, cfg)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return {}  # nothing served yet: no feedback (and no empty store created by a read)
    try:
        store = open_store(url)
        try:
            return overlay_from_store(store, cfg.serve.online_event_types).histories()
        finally:
            store.close()
    except StoreUnavailableError as exc:
        raise _fail(f"--with-feedback: {exc}") from None


@app.command()
def explain(
    user: Annotated[str, typer.Option("--user", "-u", help="User id (as in the dataset).")],
    item: Annotated[str, typer.Option("--item", "-i", help="Item id (as in the dataset).")],
    workspace: WorkspaceOpt = None,
    top: Annotated[int, typer.Option(min=1, help="Path instances shown per metapath.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Explain why an item fits a user: path instances along the selected metapaths."""
    import json

    from components.core.workspace import Paths
    from components.metapaths.pair import explain_pair

    try:
        result = explain_pair(Paths(_workspace(workspace)), user, item, top)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if not result:
        console.print(f"no selected metapath connects user {user} to item {item}")
        return
    for entry in result:
        count = f"{entry['instances']}+" if entry["instances_capped"] else str(entry["instances"])
        console.print(f"[bold]{entry['name']}[/] — {count} instance(s), score {entry['score']:.4g}")
        for path in entry["paths"]:
            console.print(f"  {path['text']}", highlight=False)


@app.command()
def leaderboard(
    workspace: WorkspaceOpt = None,
    last: Annotated[int, typer.Option(help="How many recent training runs to list.")] = 20,
) -> None:
    """List recent training runs of the workspace with their headline test metrics."""
    import mlflow

    from components.core.tracking import metric_name, tracking_uri

    ws = _workspace(workspace)
    configured = _configured_uri(ws)
    if not configured and not (ws / "mlflow.db").exists():
        raise _fail(f"no MLflow store in {ws}; run `metarec run` first")
    mlflow.set_tracking_uri(tracking_uri(ws, configured))
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`metarec.flow` = 'training'",
        max_results=last,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    names = ["ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr@10"]
    table = Table(title=f"training runs in {ws} (test metrics, full ranking)")
    for column in ("started", "model", "run id", *names):
        table.add_column(column, justify="right" if "@" in column else "left", no_wrap=True)
    for r in runs:
        started = datetime.fromtimestamp(r.info.start_time / 1000).strftime("%m-%d %H:%M")
        values = [r.data.metrics.get(metric_name(f"test.{n}")) for n in names]
        table.add_row(
            started,
            r.data.params.get("model.name", "?"),
            r.info.run_id[:8],
            *("—" if v is None else f"{v:.4f}" for v in values),
        )
    console.print(table)


@app.command()
def ui(
    workspace: WorkspaceOpt = None,
    port: Annotated[int, typer.Option(help="Port to bind on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on the workspace's store, bound to 127.0.0.1."""
    from components.core.tracking import artifact_root, tracking_uri

    ws = _workspace(workspace)
    configured = _configured_uri(ws)
    if configured:
        raise _fail(
            f"this workspace tracks to {redact_url(configured)} (tracking.uri); open that server's UI instead"
        )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri(ws),
        "--default-artifact-root",
        artifact_root(ws),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # One local reader: the default four web workers only cost memory on a laptop.
        "--workers",
        "1",
    ]
    console.print(f"MLflow UI on http://127.0.0.1:{port} (store {redact_url(tracking_uri(ws))})")
    os.execv(sys.executable, cmd)  # become the server: signals (SIGTERM) reach it, no orphan is left


server_app = typer.Typer(
    help="The local Prefect server metarec's flows report to when PREFECT_API_URL is not set.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    port: Annotated[
        int | None, typer.Option(help="Port on 127.0.0.1 (default 4200, else a free one).")
    ] = None,
) -> None:
    """Start the local Prefect server of this PREFECT_HOME (no-op when it already runs)."""
    from components.core.orchestration import OrchestrationError, configured_api_url, start

    if configured_api_url():
        err.print(f"note: PREFECT_API_URL is set ({configured_api_url()}); metarec's flows use that server")
    try:
        info, new = start(port=port, progress=lambda line: err.print(line, highlight=False))
    except OrchestrationError as exc:
        raise _fail(str(exc)) from None
    state = "started" if new else "already running"
    console.print(
        f"Prefect server {state}: UI {info.url}, API {info.api_url} (pid {info.pid}, log {info.log})",
        highlight=False,
    )


@server_app.command("status")
def server_status() -> None:
    """Say whether the local Prefect server runs, where, and which API metarec's flows use."""
    from components.core.orchestration import configured_api_url, healthy, prefect_home, read_state, running

    configured = configured_api_url()
    if configured:
        state = "answering" if healthy(configured) else "NOT answering"
        console.print(f"flows use PREFECT_API_URL={configured} ({state})")
    info = running()
    if info is not None:
        console.print(f"local Prefect server: running, UI {info.url} (pid {info.pid}, log {info.log})")
        return
    recorded = read_state()
    home = prefect_home()
    detail = f" (recorded pid {recorded.pid} does not answer; log {recorded.log})" if recorded else ""
    console.print(f"local Prefect server: not running{detail}; PREFECT_HOME={home}")
    if not configured:
        raise typer.Exit(code=3)  # like `systemctl status`: scripts can tell "not running" apart


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server of this PREFECT_HOME (its database and flow runs are kept)."""
    from components.core.orchestration import stop

    info = stop()
    console.print(
        f"stopped the Prefect server on {info.url} (pid {info.pid})" if info else "no server recorded"
    )


services_app = typer.Typer(
    help="The production stack on this machine, without Docker: PostgreSQL, MLflow, Prefect server, worker.",
    no_args_is_help=True,
)
app.add_typer(services_app, name="services")

StackHomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="METAREC_SERVICES_HOME",
        help="State, data and logs of the stack (default: $METAREC_SERVICES_HOME or ~/.metarec/services).",
    ),
]


@services_app.command("up")
def services_up(
    home: StackHomeOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for each service (default 240).")
    ] = None,
) -> None:
    """Start PostgreSQL, the MLflow tracking server, the Prefect server and a worker (reusing what runs)."""
    import shlex

    from components.core.services import ServiceError
    from components.core.stack import stack_env, stack_up

    try:
        stack, started = stack_up(
            home, timeout=timeout, progress=lambda line: err.print(line, highlight=False, markup=False)
        )
        env = stack_env(Path(stack.home))
    except ServiceError as exc:
        raise _fail(str(exc)) from None
    state = f"started {', '.join(started)}" if started else "already running"
    console.print(f"stack {state} (home {stack.home}); to use it:", highlight=False)
    hint = f'eval "$(metarec services env --home {shlex.quote(stack.home)})"'
    console.print(f"  {hint}", highlight=False, markup=False)
    for key, value in env.items():
        console.print(f"  {key}={value}", highlight=False, markup=False)


@services_app.command("down")
def services_down(
    home: StackHomeOpt = None,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the stack's data: databases, artifacts, logs.")
    ] = False,
) -> None:
    """Stop the worker, the Prefect server, the MLflow server and PostgreSQL (data kept unless --purge)."""
    from components.core.services import ServiceError
    from components.core.stack import stack_down

    try:
        stopped = stack_down(home, purge=purge)
    except ServiceError as exc:
        raise _fail(str(exc)) from None
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running", highlight=False)


@services_app.command("status")
def services_status(home: StackHomeOpt = None) -> None:
    """Say whether each service runs and answers, where, and its log; exit 3 unless all do."""
    from components.core.stack import stack_status

    report = stack_status(home)
    for item in report:
        state = "running" if item.running else "DOWN"
        console.print(f"{item.name:<9} {state:<8} {item.detail}", highlight=False, markup=False)
    if not all(item.running for item in report):
        raise typer.Exit(code=3)  # like `server status`: scripts can tell "not running" apart


@services_app.command("env")
def services_env(home: StackHomeOpt = None) -> None:
    """Print `export K=V` lines for the running stack (no passwords): eval "$(metarec services env)"."""
    import shlex

    from components.core.services import ServiceError
    from components.core.stack import stack_env

    try:
        env = stack_env(home)
    except ServiceError as exc:
        raise _fail(str(exc)) from None
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


registry_app = typer.Typer(
    help="Model registry: bundle versions, champion/challenger aliases, gated promotion, rollback.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")


def _open_registry(workspace: Path | None) -> Any:
    from registry.store import open_registry

    return open_registry(_workspace(workspace), must_exist=True)


def _registry_errors() -> tuple[type[BaseException], ...]:
    from components.bundle.format import BundleError
    from components.core.config import ConfigError
    from registry.store import RegistryError

    return (RegistryError, BundleError, ConfigError)


@registry_app.command("list")
def registry_list(workspace: WorkspaceOpt = None) -> None:
    """List the registered model's versions: aliases, primary and cold metrics, creation time."""
    try:
        reg = _open_registry(workspace)
        rows = reg.list_versions()
    except _registry_errors() as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"registered model {reg.name!r}")
    for column in ("version", "aliases", reg.cfg.primary, reg.cfg.cold_metric, "created (UTC)", "run id"):
        table.add_column(column, justify="right" if "@" in column else "left", no_wrap=True)
    for row in rows:
        metrics = ("—" if v is None else f"{v:.4f}" for v in (row["primary"], row["cold"]))
        created = row["created"].strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            row["version"], ", ".join(row["aliases"]) or "—", *metrics, created, row["run_id"] or ""
        )
    console.print(table)


@registry_app.command("show")
def registry_show(
    version: Annotated[str, typer.Argument(help="Version number, or an alias: champion, challenger.")],
    workspace: WorkspaceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show one version: aliases, tags, audit trail and model card."""
    import json

    try:
        info = _open_registry(workspace).show(version)
    except _registry_errors() as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(info, indent=2, default=str, ensure_ascii=False))
        return
    console.print(f"[bold]version {info['version']}[/] aliases: {', '.join(info['aliases']) or '—'}")
    console.print(f"created {info['created']:%Y-%m-%d %H:%M:%S} UTC, run {info['run_id']}", highlight=False)
    for key, value in info["tags"].items():
        console.print(f"  {key} = {value}", highlight=False, markup=False)
    console.print("[bold]audit[/]")
    for event in info["audit"] or [{"action": "none"}]:
        line = " ".join(
            f"{k}={event[k]}" for k in ("seq", "at", "who", "action", "from_version", "why") if k in event
        )
        console.print(f"  {line}", highlight=False, markup=False)
    console.print("[bold]model card[/]")
    console.print(info["description"] or "—", highlight=False, markup=False)


@registry_app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Argument(help="Version number to make champion.")],
    workspace: WorkspaceOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Skip the gate (needs --reason); the bundle is still verified.")
    ] = False,
) -> None:
    """Make a version champion if its bundle verifies and it passes the gate against the champion."""
    try:
        move = _open_registry(workspace).promote(version, reason=reason, force=force)
    except _registry_errors() as exc:
        raise _fail(str(exc)) from None
    for line in move.decision.reasons if move.decision else []:
        console.print(f"  {line}", highlight=False, markup=False)
    if not move.moved:
        raise _fail(f"version {move.version} not promoted; champion stays {move.previous or 'unset'}")
    forced = " (forced past the gate)" if move.event.get("action") == "force-promote" else ""
    console.print(f"champion: version {move.version}{forced}, was {move.previous or 'none'}")


@registry_app.command("rollback")
def registry_rollback(
    workspace: WorkspaceOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")] = "",
) -> None:
    """Restore the previous champion recorded in the audit trail."""
    try:
        move = _open_registry(workspace).rollback(reason=reason)
    except _registry_errors() as exc:
        raise _fail(str(exc)) from None
    console.print(f"champion: version {move.version}, rolled back from {move.previous}")


def serve_settings(ws: Path, overrides: dict[str, Any]) -> Any:
    """The workspace's ``serve`` settings with CLI overrides, store paths resolved against ``ws``."""
    from components.core import tracking
    from components.core.workspace import workspace_config

    cfg = workspace_config(ws, missing_ok=True)
    settings = cfg.serve.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    uri = settings.tracking_uri or tracking.tracking_uri(ws, cfg.tracking.uri)
    feedback = settings.feedback_url
    prefix = "sqlite:///"
    if feedback.startswith(prefix) and not feedback.startswith(prefix + "/"):
        path = (ws / feedback[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        feedback = f"{prefix}{path}"
    return settings.model_copy(
        update={
            "tracking_uri": uri,
            "feedback_url": feedback,
            "source": settings.source or "registry.source:registry_source",
        }
    )


@app.command()
def serve(
    workspace: WorkspaceOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from serve.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes sharing the port.")] = None,
    feedback_url: Annotated[
        str | None,
        typer.Option(help="Feedback store URL (sqlite:///... or postgresql://...; or METAREC_FEEDBACK_URL)."),
    ] = None,
    require_key_for_reads: Annotated[
        bool | None, typer.Option("--require-key-for-reads/--open-reads", help="Reads need the API key.")
    ] = None,
    allow_anonymous_writes: Annotated[
        bool | None, typer.Option(help="Accept feedback without a key when none is configured (demos).")
    ] = None,
) -> None:
    """Serve models:/<name>@champion over HTTP with ONNX Runtime (see docs/serving.md)."""
    from components.serving.server import serve as run_server

    ws = _workspace(workspace)
    settings = serve_settings(
        ws,
        {
            "host": host,
            "port": port,
            "workers": workers,
            "feedback_url": feedback_url,
            "require_key_for_reads": require_key_for_reads,
            "allow_anonymous_writes": allow_anonymous_writes,
        },
    )
    console.print(
        f"serving models:/{settings.model_name}@{settings.alias} on http://{settings.host}:{settings.port}"
    )
    try:
        run_server(settings)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None


# ---- drift monitoring, retraining, deployments, replay (docs/operations.md) --------------------------

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-S", help="Override a parameter: key=value.")]


def _ops_errors() -> tuple[type[BaseException], ...]:
    from components.retrain import RetrainError

    return (*_known_errors(), *_registry_errors(), RetrainError)


@app.command()
def monitor(
    workspace: WorkspaceOpt = None,
    window: Annotated[str, typer.Option(help="Window name (the retrain idempotency key).")] = "",
    since: Annotated[float | None, typer.Option(help="Only events at or after this epoch time.")] = None,
    until: Annotated[float | None, typer.Option(help="Only events at or before this epoch time.")] = None,
    trigger: Annotated[
        str | None, typer.Option(help="event | run_deployment | inline | none (default deploy.trigger).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """One drift check now: feedback since the champion's data vs its training data; report and event."""
    _orchestrate()
    from components.core.workspace import workspace_config
    from flows.monitor import monitor as monitor_flow

    ws = _workspace(workspace)
    try:
        mode = trigger or workspace_config(ws, list(set_ or [])).deploy.trigger
        result = monitor_flow(
            workspace=str(ws),
            window=window,
            since_ts=since,
            until_ts=until,
            trigger=mode,
            overrides=list(set_ or []),
        )
    except _ops_errors() as exc:
        raise _fail(str(exc)) from None
    table = Table(
        title=f"drift checks, window {result['window']} ({result['n_events']} events, "
        f"champion v{result['champion']})"
    )
    for column in ("check", "statistic", "value", "threshold", "status"):
        table.add_column(column)
    for name, stat in result["statistics"].items():
        value = "—" if stat["value"] is None else f"{stat['value']:.4g}"
        table.add_row(name, stat["statistic"], value, f"{stat['threshold']:g}", stat["status"])
    console.print(table)
    verdict = f"DRIFT: {', '.join(result['fired'])}" if result["drifted"] else "no drift"
    console.print(f"{verdict}; MLflow run {result['mlflow_run_id']} (experiment <experiment>-monitor)")
    if result["event_id"]:
        console.print(f"emitted metarec.drift.detected (event {result['event_id']})")
    triggered = result.get("triggered") or {}
    if triggered.get("mode") == "run_deployment":
        console.print(f"started {triggered['deployment']} (flow run {triggered['flow_run_id']})")
    elif triggered.get("mode") == "inline":
        reg = (triggered.get("result") or {}).get("registry") or {}
        console.print(f"retrained inline: {reg or triggered.get('result', {}).get('message')}")


@app.command()
def retrain(
    workspace: WorkspaceOpt = None,
    window: Annotated[
        str, typer.Option(help="Idempotency key; a window already retrained is not again.")
    ] = "",
    reason: Annotated[str, typer.Option(help="Why (recorded with the window).")] = "manual",
    set_: SetOpt = None,
) -> None:
    """Append the feedback since the last data version as a new DVC data version, retrain, gate."""
    _orchestrate()
    from flows.retrain import retrain as retrain_flow

    ws = _workspace(workspace)
    try:
        result = retrain_flow(workspace=str(ws), window=window, reason=reason, overrides=list(set_ or []))
    except _ops_errors() as exc:
        raise _fail(str(exc)) from None
    if result.get("reused"):
        console.print(f"window {result['window']} was already retrained; its result:")
    if not result.get("retrained"):
        console.print(f"window {result['window']}: {result.get('message', 'nothing retrained')}")
        return
    reg = result.get("registry") or {}
    verdict = "promoted to champion" if reg.get("promoted") else "kept as challenger"
    console.print(
        f"window {result['window']}: data version v{result['data_version']} (+{result['n_appended']} "
        f"interactions), training run {result['training_run_id']}, "
        f"model version {reg.get('version')} {verdict}"
    )
    for line in (reg.get("regate") or {}).get("reasons") or reg.get("reasons", []):
        console.print(f"  {line}", highlight=False, markup=False)


@app.command()
def deploy(
    workspace: WorkspaceOpt = None,
    limit: Annotated[int | None, typer.Option(help="Concurrent flow runs this process executes.")] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Prefect work pool (type process) to register the deployments on for a worker "
            "(default deploy.work_pool; none: serve them in this process)."
        ),
    ] = None,
) -> None:
    """Create the monitor (hourly) and retrain (nightly + on drift) deployments: serve them here, or
    register them on a process work pool for a worker."""
    _orchestrate()
    from components.core.workspace import workspace_config
    from flows.deploy import deploy_to_pool, serve_deployments

    ws = _workspace(workspace)
    if not (ws / "params.yaml").exists():
        raise _fail(f"no params.yaml in {ws}; train the workspace first (`metarec run`)")
    cfg = workspace_config(ws)
    d = cfg.deploy
    pool = pool or d.work_pool
    try:
        if pool:
            for name in deploy_to_pool(ws, cfg, pool):
                console.print(f"deployed {name} to work pool {pool!r} for {ws}")
            console.print(f"runs start once a worker serves the pool: prefect worker start --pool {pool}")
            return
        console.print(
            f"serving monitor/{d.name} ({d.monitor_cron} {d.timezone}) and retrain/{d.name} "
            f"({d.retrain_cron} {d.timezone}, and on metarec.drift.detected) for {ws}"
        )
        serve_deployments(ws, cfg, limit=limit)
    except _ops_errors() as exc:
        raise _fail(str(exc)) from None


@app.command()
def replay(
    workspace: WorkspaceOpt = None,
    windows: Annotated[int, typer.Option(min=1, help="Replayed windows.")] = 4,
    train_fraction: Annotated[float, typer.Option(help="Share (by time) the first model trains on.")] = 0.5,
    replay_fraction: Annotated[float, typer.Option(help="Share of the rest that is replayed.")] = 1.0,
    arm: Annotated[
        list[str] | None, typer.Option("--arm", help="static and/or retrain (repeatable; default both).")
    ] = None,
    trigger: Annotated[str, typer.Option(help="inline | event | run_deployment (retrain arm).")] = "inline",
    k: Annotated[int, typer.Option(min=1, help="List length.")] = 10,
    retrain_last: Annotated[
        bool, typer.Option(help="Also retrain after the last window (no replayed window shows it).")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Temporal replay through the serving API: with and without drift-triggered retraining."""
    _orchestrate()
    from flows.replay import replay as replay_flow

    ws = _workspace(workspace)
    caught: tuple[type[BaseException], ...] = (RuntimeError, TimeoutError, *_ops_errors())
    try:
        result = replay_flow(
            workspace=str(ws),
            windows=windows,
            train_fraction=train_fraction,
            replay_fraction=replay_fraction,
            overrides=list(set_ or []),
            arms=list(arm or []) or None,
            trigger=trigger,
            k=k,
            retrain_last=retrain_last,
        )
    except caught as exc:
        raise _fail(str(exc)) from None
    console.print(Path(result["report"]).read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(
        f"MLflow run {result['mlflow_run_id']} (experiment <experiment>-replay); {result['report']}"
    )


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m metarec``."""
    app()
