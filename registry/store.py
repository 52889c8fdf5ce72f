"""The MLflow model registry of a workspace: bundle versions, champion/challenger aliases, audited moves.

One registered model (``registry.name``) holds every exported bundle as a version. A new version
becomes ``challenger``; ``champion`` is the version that serves. The champion alias only moves under
the registry lock (MLflow has no compare-and-set for aliases) and only to a version whose bundle
verified and that passed the gate (or was forced by a named person with a reason). The lock is a file
lock in the workspace (one host), and with ``registry.lock_url`` (or ``METAREC_REGISTRY_LOCK_URL``)
also a PostgreSQL session advisory lock keyed by the registry and the registered model, which every
host promoting into the shared registry takes (docs/registry.md).

Every alias move appends an audit event: a version tag ``metarec.audit.<seq>`` holding JSON with when,
who, why, the action, the version moved from and the numbers the gate compared, and the registered
model's ``metarec.last_move`` tag repeats the latest one. The champion's history (what ``rollback``
returns to) is replayed from these events. A move is ordered alias first, audit second: a crash in
between leaves a champion that passed, and the next locked operation re-derives the missing event.

Registration is idempotent per training run: a version is keyed by its source run and its manifest
digest, so a retried ``register`` finds the version an earlier attempt created and resumes from what
that attempt left undone instead of registering a duplicate. The flows' path through these operations
(register, gate, promote) is ``registry.promotion``.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from components.bundle.format import FORMAT, MANIFEST, BundleError, file_sha256, verify_bundle
from components.core.config import REGISTRY_LOCK_URL_ENV, Config, RegistryConfig
from components.core.secrets import SecretConfigError, read_secret, redact, redact_url
from components.core.tracking import configured_uri
from components.core.workspace import workspace_config
from registry.gate import Candidate, GateDecision, Reevaluation, evaluate_gate, metric

CHAMPION = "champion"
CHALLENGER = "challenger"
AUDIT_PREFIX = "metarec.audit."
LAST_MOVE = "metarec.last_move"
MODEL_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
LOCK_FILE = "registry.lock"
#: Seconds to wait for the lock database to accept a connection.
LOCK_CONNECT_TIMEOUT = 10
#: The version tag holding the sha256 of the registered bundle's ``bundle.json``.
DIGEST_TAG = "metarec.bundle_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Moves that make their version champion, and the one that returns to the previous champion.
PROMOTING = ("promote", "force-promote", "recovered")
_ROLLBACK = "rollback"
# SQL stores cap a version's description at 5000 characters; the full card stays in bundle.json.
_DESCRIPTION_MAX = 5000


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked; nothing was changed."""


class Measurer(Protocol):
    """Measures bundles side by side in one process, for the ``reevaluated`` gate mode."""

    @property
    def data_version(self) -> dict[str, str]:
        """The data version (DVC hashes) the measurements are taken on."""
        ...

    @property
    def protocol(self) -> str:
        """One line saying how the bundles are measured (kept with the decision)."""
        ...

    def measure(self, bundles: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Metrics sections (``warm``, ``cold``, ``latency``) per version of verified bundle dirs."""
        ...


@dataclass(frozen=True)
class LoggedBundle:
    """A bundle logged as an MLflow model, ready to become a version of one or more registered models."""

    model_uri: str
    model_id: str
    run_id: str
    manifest: dict[str, Any]
    digest: str


@dataclass
class Move:
    """The outcome of a promote or rollback: whether the champion moved, and why (not)."""

    moved: bool
    version: str
    previous: str | None
    decision: GateDecision | None = None
    event: dict[str, Any] = field(default_factory=dict)


def check_registered_digest(mv: Any, bundle: Path) -> None:
    """Check a downloaded bundle's ``bundle.json`` against the digest registered with its version.

    The manifest lists every file's sha256, so this one digest pins the whole bundle to what was
    registered. A version without it cannot be told apart from one whose bundle was swapped in the
    artifact store, so it is refused, never trusted.

    Raises:
        BundleError: The version has no registered digest, or ``bundle.json`` does not match it.
    """
    expected = (mv.tags or {}).get(DIGEST_TAG)
    if not expected:
        raise BundleError(
            f"version {mv.version} of {mv.name!r} has no registered digest (version tag {DIGEST_TAG} is "
            f"missing), so its bundle cannot be checked against what was registered and is refused. "
            f"Re-register the bundle (a training run, or registry.store.Registry.register(<bundle dir>)), "
            f"which tags the new version with its digest, and promote that version instead"
        )
    digest = file_sha256(bundle / MANIFEST)
    if digest != expected:
        raise BundleError(
            f"version {mv.version}: {MANIFEST} sha256 mismatch, expected {expected} (registered), "
            f"got {digest}"
        )


def champion_history(events: list[dict[str, Any]]) -> list[str]:
    """Replay audit events into the stack of champions, the current one last.

    A promotion pushes its version; a rollback pops the champion it replaced.
    """
    stack: list[str] = []
    for event in events:
        action, version = event.get("action"), str(event.get("version"))
        if action in PROMOTING:
            if not stack or stack[-1] != version:
                stack.append(version)
        elif action == _ROLLBACK:
            if stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
    return stack


def lock_key(name: str, uri: str) -> int:
    """The PostgreSQL advisory-lock key (signed 64-bit) of registered model ``name`` in registry ``uri``.

    Every host promoting into one registry must configure the same tracking URI (its password aside)
    to compute the same key; a different registered model, or another registry, gets another lock.
    """
    ident = f"metarec.registry\0{redact_url(uri).rstrip('/')}\0{name}"
    return int.from_bytes(hashlib.sha256(ident.encode("utf-8")).digest()[:8], "big", signed=True)


def _libpq_url(url: str) -> str:
    """A lock URL as libpq takes it: SQLAlchemy's ``postgresql+driver://`` loses its driver.

    Raises:
        RegistryError: Not a PostgreSQL URL.
    """
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0].lower()
    if not sep or base not in ("postgresql", "postgres"):
        raise RegistryError(
            f"registry lock URL {redact_url(url)!r} (registry.lock_url or {REGISTRY_LOCK_URL_ENV}) is not "
            "a postgresql:// URL"
        )
    return f"{base}://{rest}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers run as an arbitrary uid)
        return "unknown"


def _signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "k")]),
        outputs=Schema(
            [
                ColSpec("string", "user_id"),
                ColSpec("string", "item_id"),
                ColSpec("long", "rank"),
                ColSpec("double", "score"),
            ]
        ),
    )


def _pip_requirements() -> list[str]:
    import mlflow

    # Pinned explicitly: inferring them would load the model (and its bundle) in a subprocess.
    return [f"mlflow=={mlflow.__version__}", "pandas", "numpy", "pyarrow", "onnxruntime"]


@dataclass
class Registry:
    """The registered model of one workspace, read and moved through MLflow's client."""

    workspace: Path
    config: Config = field(default_factory=Config)

    @property
    def cfg(self) -> RegistryConfig:
        """The ``registry`` config section."""
        return self.config.registry

    @property
    def name(self) -> str:
        """The registered model's name."""
        return self.cfg.name

    @cached_property
    def uri(self) -> str:
        """Tracking (and registry) URI: the configured one, else the workspace's sqlite store."""
        from components.core.tracking import tracking_uri

        return tracking_uri(self.workspace, self.config.tracking.uri)

    @cached_property
    def client(self) -> Any:
        """An MLflow client bound to this workspace's store (no global tracking state)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # ---- reading -------------------------------------------------------------------------------

    def model(self) -> Any:
        """The registered model (with its aliases and tags).

        Raises:
            RegistryError: No such registered model.
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(
                    f"no registered model {self.name!r} in {redact_url(self.uri)}; the training flow "
                    "registers exported bundles"
                ) from None
            raise

    def aliases(self) -> dict[str, str]:
        """Alias -> version of the registered model."""
        return {alias: str(version) for alias, version in (self.model().aliases or {}).items()}

    def versions(self) -> list[Any]:
        """Every version of the registered model, newest first."""
        escaped = self.name.replace("'", "\\'")
        found = self.client.search_model_versions(f"name='{escaped}'")
        return sorted(found, key=lambda mv: int(mv.version), reverse=True)

    def version(self, ref: str | int) -> Any:
        """One model version by number or alias (``3``, ``champion``).

        Raises:
            RegistryError: The version or alias does not exist.
        """
        from mlflow.exceptions import MlflowException

        ref = str(ref).strip()
        if ref.isdigit():
            try:
                return self.client.get_model_version(self.name, ref)
            except MlflowException:
                pass
            existing = ", ".join(str(mv.version) for mv in reversed(self.versions())) or "none"
            raise RegistryError(f"model {self.name!r} has no version {ref} (versions: {existing})")
        aliases = self.aliases()
        if ref not in aliases:
            if ref == CHAMPION:
                raise RegistryError(
                    f"registered model {self.name!r} has no champion; promote a version with "
                    "`metarec registry promote VERSION`"
                )
            raise RegistryError(
                f"model {self.name!r} has no alias {ref!r} (aliases: {', '.join(sorted(aliases)) or 'none'})"
            )
        return self.client.get_model_version(self.name, aliases[ref])

    def champion_uri(self) -> str:
        """The model URI serving resolves: ``models:/<name>@champion``.

        Raises:
            RegistryError: The model has no champion (or does not exist).
        """
        self.version(CHAMPION)
        return f"models:/{self.name}@{CHAMPION}"

    def audit(self, version: Any | None = None) -> list[dict[str, Any]]:
        """Audit events in order: of one version (a ModelVersion or number), else of the whole model."""
        if version is None:
            found = self.versions()
        else:
            found = [version if hasattr(version, "tags") else self.version(version)]
        events = []
        for mv in found:
            for key, value in (mv.tags or {}).items():
                if key.startswith(AUDIT_PREFIX):
                    with contextlib.suppress(json.JSONDecodeError):
                        events.append(json.loads(value))
        return sorted(events, key=lambda e: (int(e.get("seq", 0)), str(e.get("at", ""))))

    def candidate(self, version: Any) -> Candidate:
        """What the gate needs of a registered version, from its tags."""
        mv = version if hasattr(version, "tags") else self.version(version)
        tags = mv.tags or {}
        return Candidate(
            version=str(mv.version),
            metrics=json.loads(tags.get("metarec.metrics", "{}")),
            data_version=json.loads(tags.get("metarec.data_version", "{}")),
        )

    def list_versions(self) -> list[dict[str, Any]]:
        """One summary row per version, newest first: aliases, primary and cold metrics, creation."""
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            by_version.setdefault(version, []).append(alias)
        rows = []
        for mv in self.versions():
            metrics = json.loads((mv.tags or {}).get("metarec.metrics", "{}"))
            rows.append(
                {
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "primary": metric(metrics, self.cfg.primary),
                    "cold": metric(metrics, self.cfg.cold_metric),
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
                    "run_id": mv.run_id,
                    "git_commit": (mv.tags or {}).get("metarec.git_commit", ""),
                }
            )
        return rows

    def show(self, ref: str | int) -> dict[str, Any]:
        """Everything about one version: aliases, tags (audit apart), description, audit events."""
        mv = self.version(ref)
        version = str(mv.version)
        tags = {k: v for k, v in sorted((mv.tags or {}).items()) if not k.startswith(AUDIT_PREFIX)}
        return {
            "version": version,
            "aliases": sorted(a for a, v in self.aliases().items() if v == version),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
            "run_id": mv.run_id,
            "source": mv.source,
            "tags": tags,
            "description": mv.description or "",
            "audit": self.audit(mv),
        }

    def verify(self, ref: str | int) -> dict[str, Any]:
        """Download a version's bundle, check it against its manifest and the registered digest.

        Returns:
            The verified manifest.

        Raises:
            BundleError: A file is missing, unlisted or altered, ``bundle.json`` itself changed since
                registration, or the version has no registered digest; the message names the file.
        """
        with tempfile.TemporaryDirectory(prefix="metarec-verify-") as tmp:
            _, manifest = self.download_bundle(ref, Path(tmp))
        return manifest

    def download_bundle(self, ref: str | int, dest: Path) -> tuple[Path, dict[str, Any]]:
        """Download a version's bundle under ``dest`` and verify it; return its path and manifest.

        Raises:
            BundleError: As :meth:`verify`.
        """
        import mlflow
        import yaml

        mv = self.version(ref)
        root = self.client.get_model_version_download_uri(self.name, mv.version).rstrip("/")
        dest = Path(dest)
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root}/MLmodel", dst_path=str(dest), tracking_uri=self.uri
        )
        flavor = (yaml.safe_load(Path(mlmodel).read_text(encoding="utf-8")) or {}).get("flavors", {})
        try:
            sub = flavor["python_function"]["artifacts"]["bundle"]["path"]
        except (KeyError, TypeError):
            raise BundleError(f"version {mv.version}: its MLmodel has no 'bundle' artifact") from None
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root}/{sub}", dst_path=str(dest / "bundle"), tracking_uri=self.uri
        )
        try:
            manifest = verify_bundle(local)
        except BundleError as exc:
            raise BundleError(f"version {mv.version}: {exc}") from None
        check_registered_digest(mv, Path(local))
        return Path(local), manifest

    # ---- writing -------------------------------------------------------------------------------

    @cached_property
    def lock_url(self) -> str | None:
        """The cross-host lock database: ``METAREC_REGISTRY_LOCK_URL[_FILE]``, else ``registry.lock_url``.

        Raises:
            RegistryError: Both variables are set, or the secret file is unusable.
        """
        try:
            url = read_secret(REGISTRY_LOCK_URL_ENV) or self.cfg.lock_url
        except SecretConfigError as exc:
            raise RegistryError(f"registry lock: {exc}") from None
        return url or None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the registry lock: one alias move at a time, across processes and, configured, hosts.

        The workspace's file lock always (threads and processes of this host), then, with a lock URL,
        the PostgreSQL advisory lock (every host); both within ``registry.lock_timeout`` together.

        Raises:
            RegistryError: The lock stayed held past the timeout, or the lock database is unreachable.
        """
        deadline = time.monotonic() + self.cfg.lock_timeout
        with self._file_lock(), self._advisory_lock(deadline):
            yield

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """The workspace's lock file: one alias move at a time among this host's processes."""
        from filelock import FileLock, Timeout

        self.workspace.mkdir(parents=True, exist_ok=True)
        # flock on a fresh open file: threads of one process exclude each other as processes do.
        lock = FileLock(str(self.workspace / LOCK_FILE), timeout=self.cfg.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise RegistryError(
                f"another registry operation holds {self.workspace / LOCK_FILE} "
                f"for more than {self.cfg.lock_timeout:g}s; retry later"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _advisory_lock(self, deadline: float) -> Iterator[None]:
        """The PostgreSQL session advisory lock of this registered model, when a lock URL is set.

        Held by a connection of its own for the whole operation: a process that dies releases it with
        its connection, so a crash never leaves the registry locked.
        """
        url = self.lock_url
        if url is None:
            yield
            return
        import psycopg

        key = lock_key(self.name, self.uri)
        shown = redact_url(url)
        try:
            conn = psycopg.connect(
                _libpq_url(url),
                autocommit=True,
                connect_timeout=LOCK_CONNECT_TIMEOUT,
                application_name="metarec registry lock",
            )
        except psycopg.Error as exc:
            raise RegistryError(
                f"cannot connect to the registry lock database {shown} (registry.lock_url or "
                f"{REGISTRY_LOCK_URL_ENV}): {redact(str(exc).strip())}"
            ) from None
        try:
            # lock_timeout bounds the wait in pg_advisory_lock itself (0 would mean forever).
            wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{wait_ms}ms",))
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.errors.LockNotAvailable:
                raise RegistryError(
                    f"another registry operation holds the promotion lock of {self.name!r} (advisory "
                    f"lock {key} in {shown}) for more than {self.cfg.lock_timeout:g}s; retry later"
                ) from None
            except psycopg.Error as exc:
                raise RegistryError(
                    f"cannot take the registry lock in {shown}: {redact(str(exc).strip())}"
                ) from None
            try:
                yield
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            conn.close()

    def _event(
        self,
        events: list[dict[str, Any]],
        action: str,
        version: str,
        previous: str | None,
        why: str,
        **extra: Any,
    ) -> dict[str, Any]:
        seq = max((int(e.get("seq", 0)) for e in events), default=0) + 1
        return {
            "seq": seq,
            "at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "who": _user(),
            "action": action,
            "version": version,
            "from_version": previous,
            "why": why,
            **extra,
        }

    def _record(self, event: dict[str, Any], events: list[dict[str, Any]]) -> None:
        text = json.dumps(event, sort_keys=True, default=str)
        self.client.set_model_version_tag(
            self.name, event["version"], f"{AUDIT_PREFIX}{event['seq']:06d}", text
        )
        self.client.set_registered_model_tag(self.name, LAST_MOVE, text)
        events.append(event)

    def _reconcile(self) -> list[dict[str, Any]]:
        """Re-derive what an interrupted move left unwritten; return the audit events. Call locked."""
        events = self.audit()
        aliases = self.aliases()
        champion = aliases.get(CHAMPION)
        stack = champion_history(events)
        if champion is not None and (not stack or stack[-1] != champion):
            # The alias moved but its audit event was never written (a crash between the two steps,
            # or a change made outside metarec): record the move so history and rollback see it. Back
            # on the previous champion, it was a rollback; anything else counts as a promotion.
            action = _ROLLBACK if len(stack) >= 2 and stack[-2] == champion else "recovered"
            event = self._event(
                events,
                action,
                champion,
                stack[-1] if stack else None,
                "champion alias found without its audit event; re-derived",
            )
            self._record(event, events)
        elif events:
            last = self.model().tags.get(LAST_MOVE)
            if last is None or json.loads(last).get("seq") != events[-1].get("seq"):
                self.client.set_registered_model_tag(
                    self.name, LAST_MOVE, json.dumps(events[-1], sort_keys=True, default=str)
                )
        if champion is not None and aliases.get(CHALLENGER) == champion:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        return events

    def _move_champion(
        self,
        version: str,
        previous: str | None,
        action: str,
        why: str,
        events: list[dict[str, Any]],
        compared: dict[str, Any],
        reasons: list[str],
    ) -> dict[str, Any]:
        """Point champion at ``version``, then audit, then retire its challenger alias. Call locked."""
        # Order matters for crashes: the alias moves only to an already-vetted version, and the audit
        # written after it is re-derived by _reconcile if this process dies in between.
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        event = self._event(events, action, version, previous, why, compared=compared, reasons=reasons)
        self._record(event, events)
        if self.aliases().get(CHALLENGER) == version:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        return event

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name, description="metarec recommender bundles (see each version's model card)"
            )
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise

    @contextlib.contextmanager
    def _source_run(self, run_id: str | None) -> Iterator[Any]:
        """The run to log the model in: the given one (resumed unless active), else a new one."""
        import mlflow

        from components.core.tracking import git_commit, setup

        experiment_id = setup(self.workspace, self.config.tracking.experiment, self.config.tracking.uri)
        active = mlflow.active_run()
        if run_id and active is not None and active.info.run_id == run_id:
            yield active
        elif run_id:
            with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
                yield run
        else:
            tags = {"metarec.stage": "register", "metarec.git_commit": git_commit()}
            with mlflow.start_run(
                experiment_id=experiment_id, run_name="register", nested=active is not None, tags=tags
            ) as run:
                yield run

    def _version_tags(self, manifest: dict[str, Any], digest: str) -> dict[str, str]:
        from components.core.tracking import metric_name

        if not _SHA256.fullmatch(digest or ""):
            # Every version carries its manifest's digest: serving and promotion refuse one without it.
            raise RegistryError(f"refusing to register a bundle without its {MANIFEST} sha256 ({digest!r})")
        tags = {
            "metarec.bundle_format": FORMAT,
            DIGEST_TAG: digest,
            "metarec.git_commit": str(manifest["git_commit"]),
            "metarec.data_version": json.dumps(manifest["data_version"], sort_keys=True),
            "metarec.metrics": json.dumps(manifest["metrics"], sort_keys=True),
        }
        # One tag per numeric metric so the UI and search filters see them without parsing JSON.
        for section, values in manifest["metrics"].items():
            for name, value in (values if isinstance(values, dict) else {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    tags[metric_name(f"metric.{section}.{name}")] = repr(float(value))
        return tags

    def log_bundle(self, bundle_dir: str | Path, run_id: str | None = None) -> LoggedBundle:
        """Verify a bundle and log it as a pyfunc model from code (no pickle), not yet registered.

        Args:
            bundle_dir: The exported bundle directory.
            run_id: The run the model is logged in (the training run); None starts a ``register`` run.

        Raises:
            BundleError: The bundle does not match its manifest.
        """
        import mlflow
        import pandas as pd

        bundle = Path(bundle_dir).resolve()
        manifest = verify_bundle(bundle)
        digest = file_sha256(bundle / MANIFEST)
        # A real user of the bundle, so MLflow's serving check of the input example exercises the model.
        example_user = "1"
        users_file = bundle / "users.parquet"
        if users_file.exists():
            ids = pd.read_parquet(users_file, columns=["user_id"]).user_id.astype(str)
            example_user = str(ids.iloc[0]) if len(ids) else example_user
        with self._source_run(run_id) as run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"bundle": str(bundle)},
                signature=_signature(),
                input_example=pd.DataFrame({"user_id": [example_user], "k": [10]}),
                pip_requirements=_pip_requirements(),
            )
            return LoggedBundle(info.model_uri, info.model_id, run.info.run_id, manifest, digest)

    def add_version(self, logged: LoggedBundle) -> Any:
        """Register a logged bundle as a new version and point ``challenger`` at it.

        The version carries the model card as its description and the bundle's metrics, git commit,
        data version and manifest digest as tags; the source run is tagged with the version.

        Returns:
            The new ModelVersion.

        Raises:
            RegistryError: ``logged`` has no manifest digest (nothing is registered).
        """
        manifest = logged.manifest
        card = manifest["model_card"]
        if len(card) > _DESCRIPTION_MAX:
            card = card[: _DESCRIPTION_MAX - 60] + "\n\n…(truncated; the full card is in bundle.json)"
        tags = self._version_tags(manifest, logged.digest)  # refuses a bundle without its digest
        with self._locked():
            self._ensure_model()
            events = self._reconcile()
            # Checked again under the lock: a concurrent or earlier attempt may have registered it.
            existing = self.registered_for(logged.run_id, logged.digest)
            if existing is not None:
                return self._resume(existing, events)
            mv = self.client.create_model_version(
                self.name,
                source=logged.model_uri,
                run_id=logged.run_id,
                tags=tags,
                description=card,
                model_id=logged.model_id,
            )
            self._make_challenger(str(mv.version), events)
        return self._tag_source_run(mv)

    def registered_for(self, run_id: str | None, digest: str) -> Any | None:
        """The version registered from run ``run_id`` with manifest digest ``digest`` (None: none yet)."""
        if not run_id:
            return None
        escaped = self.name.replace("'", "\\'")
        found = self.client.search_model_versions(f"name='{escaped}' and run_id='{run_id}'")
        same = [mv for mv in found if (mv.tags or {}).get(DIGEST_TAG) == digest]
        return min(same, key=lambda mv: int(mv.version), default=None)

    def _make_challenger(self, version: str, events: list[dict[str, Any]]) -> None:
        """Point ``challenger`` at a newly registered version and audit it. Call locked."""
        previous = self.aliases().get(CHALLENGER)
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        self._record(self._event(events, CHALLENGER, version, previous, "newly registered"), events)

    def _resume(self, mv: Any, events: list[dict[str, Any]]) -> Any:
        """Finish the registration an interrupted attempt left half done; return the version. Call locked."""
        version = str(mv.version)
        # Its challenger event is the last step of registering; once written (or once the version has
        # moved on, to champion), registration is complete and a newer challenger keeps its alias.
        done = any(e.get("version") == version and e.get("action") == CHALLENGER for e in events)
        if not done and self.aliases().get(CHAMPION) != version:
            self._make_challenger(version, events)
        return self._tag_source_run(mv)

    def _tag_source_run(self, mv: Any) -> Any:
        """Tag the version's source run with it; return the version as now stored."""
        self.client.set_tag(mv.run_id, "metarec.registry.model", self.name)
        self.client.set_tag(mv.run_id, "metarec.registry.version", str(mv.version))
        return self.client.get_model_version(self.name, str(mv.version))

    def register(self, bundle_dir: str | Path, run_id: str | None = None) -> Any:
        """Log a bundle and register it as the newest version, ``challenger``; idempotent per run.

        A bundle already registered from ``run_id`` (same manifest digest) is not logged again: its
        version is returned, with any step an interrupted registration left undone completed.

        Args:
            bundle_dir: The exported bundle directory.
            run_id: The run the model is logged in (the training run); None starts a ``register`` run.

        Returns:
            The new (or already registered) ModelVersion.

        Raises:
            BundleError: The bundle does not match its manifest.
        """
        manifest = Path(bundle_dir) / MANIFEST
        if run_id and manifest.is_file():
            existing = self.registered_for(run_id, file_sha256(manifest))
            if existing is not None:
                with self._locked():
                    return self._resume(existing, self._reconcile())
        return self.add_version(self.log_bundle(bundle_dir, run_id))

    def reevaluate(self, ref: str | int, measurer: Measurer) -> Reevaluation:
        """Measure a version and the current champion side by side, from their verified bundles.

        Raises:
            RegistryError: No champion, or the version is the champion.
            BundleError: Either bundle fails verification.
        """
        version = str(self.version(ref).version)
        champion = self.aliases().get(CHAMPION)
        if champion is None or champion == version:
            raise RegistryError(f"version {version} has no other champion to be re-evaluated against")
        with tempfile.TemporaryDirectory(prefix="metarec-reevaluate-") as tmp:
            bundles = {v: self.download_bundle(v, Path(tmp) / f"v{v}")[0] for v in (champion, version)}
            measured = measurer.measure(bundles)
        return Reevaluation(champion, version, dict(measurer.data_version), measured, measurer.protocol)

    def promote(
        self,
        ref: str | int,
        reason: str = "",
        force: bool = False,
        reevaluation: Reevaluation | None = None,
    ) -> Move:
        """Make a version champion if its bundle verifies and it passes the gate against the champion.

        Args:
            ref: The version number (or an alias such as ``challenger``).
            reason: Why; required with ``force``.
            force: Promote even if the gate refuses (never past a bundle that fails verification).
            reevaluation: Gate in ``reevaluated`` mode on these measurements (:meth:`reevaluate`); the
                gate refuses them if the champion moved since they were taken.

        Returns:
            The move; ``moved`` is False when the gate (or verification) refused, with its reasons.

        Raises:
            RegistryError: No such version, ``force`` without a reason, or the lock timed out.
        """
        if force and not reason.strip():
            raise RegistryError("--force needs a --reason: forced promotions are audited with it")
        with self._locked():
            mv = self.version(ref)
            version = str(mv.version)
            events = self._reconcile()
            champion = self.aliases().get(CHAMPION)
            try:
                manifest = self.verify(version)
            except BundleError as exc:
                decision = GateDecision(
                    False, [f"FAIL: bundle integrity: {exc}"], {"challenger": version, "champion": champion}
                )
                return Move(False, version, champion, decision)
            challenger = Candidate(version, manifest["metrics"], manifest["data_version"])
            incumbent = self.candidate(champion) if champion is not None else None
            decision = evaluate_gate(challenger, incumbent, self.cfg, reevaluation)
            if champion == version or not (decision.promote or force):
                return Move(False, version, champion, decision)
            action = "promote" if decision.promote else "force-promote"
            why = reason.strip() or "passed the gate"
            event = self._move_champion(
                version, champion, action, why, events, decision.compared, decision.reasons
            )
            return Move(True, version, champion, decision, event)

    def rollback(self, reason: str = "") -> Move:
        """Restore the champion before the current one, as the audit trail records it.

        Raises:
            RegistryError: No champion, no previous champion, or the previous one no longer verifies.
        """
        with self._locked():
            events = self._reconcile()
            champion = self.aliases().get(CHAMPION)
            if champion is None:
                raise RegistryError(f"registered model {self.name!r} has no champion to roll back from")
            stack = champion_history(events)
            if len(stack) < 2:
                raise RegistryError(
                    f"no previous champion of {self.name!r} to roll back to: version {champion} is the first"
                )
            target = stack[-2]
            try:
                self.verify(target)
            except BundleError as exc:
                raise RegistryError(f"cannot roll back to version {target}: {exc}") from None
            compared = {
                self.cfg.primary: {
                    "restored": metric(self.candidate(target).metrics, self.cfg.primary),
                    "replaced": metric(self.candidate(champion).metrics, self.cfg.primary),
                }
            }
            why = reason.strip() or "rollback"
            event = self._move_champion(target, champion, _ROLLBACK, why, events, compared, [])
            return Move(True, target, champion, None, event)


def open_registry(workspace: str | Path, config: Config | None = None, must_exist: bool = False) -> Registry:
    """The registry of a workspace, configured by its ``params.yaml`` unless ``config`` is given.

    Raises:
        RegistryError: ``must_exist`` and the workspace has no MLflow store yet.
    """
    ws = Path(workspace).resolve()
    config = workspace_config(ws, missing_ok=True) if config is None else config
    if must_exist and not configured_uri(config.tracking.uri) and not (ws / "mlflow.db").exists():
        raise RegistryError(f"no MLflow store in {ws}; run `metarec run` first")
    return Registry(ws, config)
