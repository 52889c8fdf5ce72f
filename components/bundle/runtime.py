"""The one ONNX Runtime path: the session factory and the encoder and scorer wrappers.

Serving (:class:`components.bundle.engine.BundleEngine`), offline inference and the export stage's
parity checks all run the bundle's ONNX files through this module, so the parity figures measure the
code that serves. No torch here: the serving process never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from components.core.storage import read_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import onnxruntime as ort

    from components.model.features import FeatureBank

# The bundle's ONNX files (written by components.bundle.export) and the scorer's outputs.
SCORER_ONNX = "scorer.onnx"
ENCODER_ONNX = "encoder.onnx"
ENCODER_JSON = "encoder.json"
TOKENIZER_DIR = "tokenizer"
SCORER_INPUTS = ("history", "profile", "features")
SCORER_OUTPUTS = ("scores", "gates")


#: Execution providers a configuration may ask for; ``cpu`` is the default and the tested path.
PROVIDERS = ("cpu", "cuda")
_ORT_NAMES = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def session(path: Path, threads: int = 1, provider: str = "cpu") -> ort.InferenceSession:
    """An ONNX Runtime session with ``threads`` intra-op threads, ORT's defaults otherwise.

    The defaults are all graph optimisations and sequential execution, which the export stage used to set
    explicitly. ``provider="cuda"`` runs on the GPU when the installed runtime (onnxruntime-gpu) can
    reach one and falls back to the CPU otherwise, with a warning; the providers in use are on
    ``session.get_providers()``.

    Raises:
        ValueError: ``provider`` is not one of :data:`PROVIDERS`.
    """
    import onnxruntime as ort

    if provider not in _ORT_NAMES:
        raise ValueError(f"execution provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    wanted = [p for p in _ORT_NAMES[provider] if p in ort.get_available_providers()]
    made = ort.InferenceSession(str(path), options, providers=wanted or ["CPUExecutionProvider"])
    if provider == "cuda" and made.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu lists CUDA even where no GPU or CUDA library is present; the session then runs
        # on the CPU, which must be said, not hidden.
        log.warning("%s: CUDA execution provider unavailable here; running on the CPU", path.name)
    return made


class OnnxEncoder:
    """Embed texts with an exported encoder (``input_ids``/``attention_mask`` in, ``embedding`` out).

    The ``tokenizers`` library truncates to ``max_length`` and right-pads with ``pad_id`` to the longest
    text. Many texts (the export's item texts) run in length-sorted batches of ``batch_size``, each cut
    to its own longest text, as :meth:`components.text.encoder.Encoder.encode` batches: memory stays
    bounded, little compute goes to padding, and the fp32 parity compares like batches with like. One
    text (a cold user's profile when serving) is one unpadded batch either way.
    """

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_json: Path,
        max_length: int,
        pad_id: int,
        batch_size: int = 64,
        threads: int = 1,
        provider: str = "cpu",
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=pad_id)
        self.session = session(onnx_path, threads, provider)
        self.batch_size = batch_size
        self.dim = int(self.session.get_outputs()[0].shape[1])

    @classmethod
    def from_bundle(
        cls, bundle: Path, batch_size: int = 64, threads: int = 1, provider: str = "cpu"
    ) -> OnnxEncoder:
        """The encoder of a bundle directory (``encoder.onnx``, ``tokenizer/``, ``encoder.json``)."""
        meta = read_json(Path(bundle) / ENCODER_JSON)
        tokenizer = Path(bundle) / TOKENIZER_DIR / "tokenizer.json"
        max_length, pad_id = int(meta["max_length"]), int(meta["pad_id"])
        return cls(Path(bundle) / ENCODER_ONNX, tokenizer, max_length, pad_id, batch_size, threads, provider)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings ``(n, dim)`` float32 in input order."""
        if isinstance(texts, str) or not texts:
            raise ValueError("expected a non-empty list of texts")
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encoded], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64)
        lengths = mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = int(lengths[rows[0]])  # right padding: the batch's longest text ends there
            feeds = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]}
            out[rows] = self.session.run(["embedding"], feeds)[0]
        return out


class OnnxScorer:
    """The fp32 ONNX scorer with the feature bank and profiles that make its inputs.

    Inputs ``history`` ``[batch, N]``, ``profile`` ``[batch, D]``, ``features`` ``[batch, C, N]``;
    outputs ``scores`` ``[batch, N]`` and ``gates`` ``[batch, C]``.
    """

    def __init__(
        self, path: Path, bank: FeatureBank, profile: np.ndarray, threads: int = 1, provider: str = "cpu"
    ) -> None:
        self.session = session(path, threads, provider)
        self.bank = bank
        self.profile = np.asarray(profile, dtype=np.float32)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[Any]:
        """``InferenceSession.run`` itself, for callers that feed or time the bare graph."""
        return list(self.session.run(output_names, feeds))

    def __call__(
        self, history: np.ndarray, profile: np.ndarray, features: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, gates)`` for dense inputs."""
        arrays = (history, profile, features)
        feeds = {
            k: np.ascontiguousarray(a, dtype=np.float32) for k, a in zip(SCORER_INPUTS, arrays, strict=True)
        }
        scores, gates = self.session.run(list(SCORER_OUTPUTS), feeds)
        return np.asarray(scores), np.asarray(gates)

    def score_rows(
        self,
        history: sp.csr_matrix,
        users: np.ndarray | None = None,
        profile: np.ndarray | None = None,
        attributes: dict[str, sp.csr_matrix] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, gates, features)`` of known ``users``' history rows, or of one cold user's (with
        its ``profile`` vector and its profile's ``attributes``)."""
        history = sp.csr_matrix(history, dtype=np.float32)
        features = self.bank.rows(history, users, attributes)
        prof = self.profile[users] if users is not None else np.asarray(profile, np.float32).reshape(1, -1)
        scores, gates = self(history.toarray(), prof, features)
        return scores, gates, features

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Scores ``(len(users), n_items)`` of known users from ``history`` (for the evaluate protocol)."""
        if history is None:
            raise ValueError("OnnxScorer needs the history matrix")
        users = np.asarray(users, dtype=np.int64)
        return self.score_rows(sp.csr_matrix(history)[users], users)[0]
