"""Calibration against an independent evaluator on ml-100k (user_temporal 80/10/10, implicit).

Reference test NDCG@10: Pop 0.079, ItemKNN (cosine, all neighbours) 0.110; ours must agree within
±0.005, otherwise the split protocol or a metric is wrong. Needs PyPI once to fetch the recbole wheel
(cached in $METAREC_CACHE_DIR afterwards).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components import baselines
from components.core.config import SplitConfig
from components.data import fetch, ingest, split
from components.evaluation import protocol as evaluate

REFERENCE = {"pop": 0.079, "itemknn": 0.110}


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> evaluate.EvalData:
    raw = tmp_path_factory.mktemp("ml100k") / "raw"
    fetch.fetch(raw, None, "ml-100k")
    dataset = ingest.load_dataset(raw, "ml-100k")
    assert dataset.report["n_interactions"] == 100_000
    parts = split.split_interactions(dataset.interactions, SplitConfig())
    n_u, n_i = len(dataset.users), len(dataset.items)
    return evaluate.EvalData(*(split.to_matrix(parts.part(p), n_u, n_i) for p in split.PARTS))


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_baseline_matches_reference(ml100k: evaluate.EvalData, name: str) -> None:
    model = baselines.build_model(name, {}, seed=0).fit(ml100k.train)
    result = evaluate.evaluate(model, ml100k, "test", [10, 20], [20, 50, 100])
    ndcg = result["overall"]["ndcg@10"]
    assert result["overall"]["n_users"] == 943
    assert abs(ndcg - REFERENCE[name]) <= 0.005, (
        f"{name}: test ndcg@10 {ndcg:.4f} vs reference {REFERENCE[name]}"
    )


@pytest.mark.network
def test_split_sizes_match_protocol(ml100k: evaluate.EvalData) -> None:
    # floor(n*0.8) / floor(n*0.1) / remainder per user, summed over ml-100k's 943 users.
    assert (ml100k.train.nnz, ml100k.valid.nnz, ml100k.test.nnz) == (79619, 9596, 10785)


def test_fetch_rejects_tampered_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fetch.RECBOLE_WHEEL).write_bytes(b"not the wheel")
    monkeypatch.setenv("METAREC_CACHE_DIR", str(cache))
    # A cached file with the wrong checksum is discarded and downloaded again, never used.
    wheel = fetch.download_recbole_wheel()
    assert fetch.sha256_file(wheel) == fetch.RECBOLE_WHEEL_SHA256


def test_extract_rejects_tampered_member(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in fetch.ML100K_SHA256:
            archive.writestr(fetch.ML100K_PREFIX + name, b"tampered\n")
    dest = tmp_path / "raw"
    with pytest.raises(fetch.FetchError, match=r"ml-100k\.inter: sha256 .* != pinned"):
        fetch.extract_ml100k(wheel, dest)
    assert not dest.exists()
    assert not list(tmp_path.glob(".raw.tmp-*"))


@pytest.mark.network
def test_mined_metapaths_beat_pop_on_validation(tmp_path_factory: pytest.TempPathFactory) -> None:
    from components.core.config import Config
    from components.data import kg
    from components.metapaths import mining
    from components.metapaths.counting import Counter
    from components.metapaths.schema import enumerate_metapaths

    raw = tmp_path_factory.mktemp("ml100k-mine") / "raw"
    fetch.fetch(raw, None, "ml-100k")
    dataset = ingest.load_dataset(raw, "ml-100k")
    cfg = Config()
    graph, _ = kg.build_graph(
        dataset.users, dataset.items, dataset.kg, cfg.kg.item_fields, cfg.kg.user_fields, cfg.kg.age_buckets
    )
    parts = split.split_interactions(dataset.interactions, SplitConfig())
    n_u, n_i = len(dataset.users), len(dataset.items)
    train, valid = split.to_matrix(parts.train, n_u, n_i), split.to_matrix(parts.valid, n_u, n_i)
    counter = Counter(kg.with_interactions(graph, train), cfg.mine.weighting, cfg.mine.damping)
    candidates = enumerate_metapaths(counter.graph.schema, cfg.mine.max_length)
    assert len(candidates) == 104
    blocks = mining.validation_blocks(valid, cfg.mine.sample_users, cfg.mine.block_size, cfg.seed)
    rows, steps = mining.select(
        candidates, blocks, mining.serial_map(counter, train, valid), cfg.mine.top_k, cfg.mine.min_gain
    )
    combined = max(s["combined_ndcg"] for s in steps if "combined_ndcg" in s)
    pop = mining.popularity_ndcg(train, valid, blocks)
    assert abs(pop - 0.0637) < 0.002  # the pipeline's Pop on validation, same protocol
    assert combined > pop * 1.5, f"selected metapaths {combined:.4f} vs Pop {pop:.4f}"
    assert steps[0]["name"] == "user–item–user–item"
