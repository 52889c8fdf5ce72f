"""Text features on a tiny random BERT built in a temp dir: verbalisation, encoding, cache, LoRA.

No network and no real model: the BERT (32 hidden units, 2 layers) and its word-level vocabulary are
created here, so every test runs in well under a second on two cores.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from components.core.config import FinetuneSection
from components.data import ingest, kg
from components.data.kg import HeteroGraph, Relation
from components.text import verbalise
from components.text.encoder import (
    EmbeddingCache,
    Encoder,
    ModelError,
    ModelRef,
    encode_cached,
    resolve_model,
)
from components.text.features import encode_items, encode_users, load_embeddings, save_embeddings
from components.text.finetune import FinetuneConfig, FinetuneResult, finetune, lr_factor, validation_signal
from components.text.pairs import PairSet, holdout_pairs, next_item_pairs

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"
ITEM_FIELDS = {"class": "genre"}
USER_FIELDS = {"age": "age_bucket", "gender": "gender", "occupation": "occupation"}
AGES = [17, 24, 34, 44, 49, 55]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Sentences whose words the tiny vocabulary covers: the fixture's titles, genres and demographics
# (read from the files below), the texts the templates add, and the fine-tuning toy task.
EXTRA_TEXT = (
    "Genres: Recently watched: nothing yet User aged male female unknown Prequel of "
    "Directed by the director of Shares cast with Same language as Pink Apple "
    "user likes red green blue yellow black white pink gray apple pear plum fig"
)

torch.set_num_threads(1)


def make_model(directory: Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a random tiny BERT (and a word-level tokenizer) into ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    corpus = " ".join([(TINY / "tiny.item").read_text(), (TINY / "tiny.user").read_text(), EXTRA_TEXT])
    # BERT's pre-tokeniser splits words from punctuation; a word-level vocabulary needs both.
    vocab = SPECIAL + sorted(set(re.findall(r"\w+|[^\w\s]", corpus.lower())) - {w.lower() for w in SPECIAL})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    if with_tokenizer:
        vocab_file = directory.parent / f"{directory.name}-vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        # transformers 5 takes the vocabulary as `vocab=`; `vocab_file=` is silently ignored and would
        # leave a tokenizer that maps every word to [UNK].
        BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> ModelRef:
    return resolve_model(str(model_dir))


@pytest.fixture(scope="module")
def encoder(ref: ModelRef) -> Encoder:
    return Encoder(ref, max_length=32, batch_size=3, threads=1)


@pytest.fixture(scope="module")
def tiny() -> tuple[HeteroGraph, ingest.Dataset]:
    data = ingest.load_dataset(TINY, "tiny")
    graph, _ = kg.build_graph(data.users, data.items, data.kg, ITEM_FIELDS, USER_FIELDS, AGES)
    return graph, data


# ---------------------------------------------------------------- verbalisation


def test_item_text_on_tiny_fixture(tiny: tuple[HeteroGraph, ingest.Dataset]) -> None:
    graph, data = tiny
    texts = verbalise.item_texts(data.items, graph, max_facts=6, max_titles=3)
    # i1: genres from the class column; KG facts rendered through the other items sharing the entity
    # (director d1 -> i2; actors a1 -> i2, a2 -> i4; language en -> i2, i3, i5 capped at 3 titles).
    assert texts[0] == (
        "Alpha One (1990). Genres: Action Drama. Prequel of: Beta Two (1991). "
        "Directed by the director of: Beta Two (1991). "
        "Shares cast with: Beta Two (1991), Delta Four (1993). "
        "Same language as: Beta Two (1991), Gamma Three (1992), Epsilon Five (1994)."
    )
    assert texts[1].startswith("Beta Two (1991). Genres: Comedy. Prequel: Alpha One (1990).")
    assert texts[7] == "Theta Eight (1997). Genres: Comedy Drama."  # i8 is not linked to the KG
    assert verbalise.item_texts(data.items, graph, max_facts=6, max_titles=3) == texts  # deterministic
    short = verbalise.item_texts(data.items, graph, "{name} | {year} | {facts}", max_facts=1)
    assert verbalise.item_texts(data.items, graph)[0].endswith(
        "Same language as: Beta Two (1991), Gamma Three (1992)."
    )
    assert short[0] == "Alpha One | 1990 | Prequel of: Beta Two (1991)."
    assert verbalise.item_texts(data.items, None)[0] == "Alpha One (1990). Genres: Action Drama."


def test_user_text_on_tiny_fixture(tiny: tuple[HeteroGraph, ingest.Dataset]) -> None:
    _, data = tiny
    texts = verbalise.user_texts(data.users, data.interactions, data.items, n_recent=3)
    # u1 watched i1..i5 at 1001..1041: the three latest, newest first.
    assert texts[0] == (
        "User aged 15, male, student. "
        "Recently watched: Epsilon Five (1994), Delta Four (1993), Gamma Three (1992)."
    )
    no_history = verbalise.user_texts(data.users, data.interactions.iloc[:0], data.items, n_recent=3)
    assert no_history[1] == "User aged 22, female, engineer. Recently watched: nothing yet."


def test_count_facts_for_awards() -> None:
    items = pd.DataFrame(
        {
            "item": [0, 1],
            "item_id": ["a", "b"],
            "movie_title": ["Heat", "Collateral"],
            "release_year": [1995, 2004],
        }
    )
    awards = sp.csr_matrix(np.array([[1, 1, 1], [1, 0, 0]], dtype=np.float32))
    director = sp.csr_matrix(np.array([[1], [1]], dtype=np.float32))
    graph = HeteroGraph(
        {"item": ["a", "b"], "award_won": ["x", "y", "z"], "director": ["d"]},
        {
            "film.film.award_won": Relation("film.film.award_won", "item", "award_won", awards),
            "film.film.directed_by": Relation("film.film.directed_by", "item", "director", director),
        },
    )
    texts = verbalise.item_texts(items, graph, "{title}. {facts}", max_facts=5)
    assert texts == [
        "Heat (1995). Directed by the director of: Collateral (2004). 3 awards won.",
        "Collateral (2004). Directed by the director of: Heat (1995). 1 award won.",
    ]


def test_verbalisation_errors(tiny: tuple[HeteroGraph, ingest.Dataset]) -> None:
    graph, data = tiny
    with pytest.raises(ValueError, match=r"item 'i8': text is empty"):
        verbalise.item_texts(data.items, graph, "{facts}", max_facts=3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['plot'\]"):
        verbalise.item_texts(data.items, graph, "{title} {plot}", max_facts=3)
    with pytest.raises(ValueError, match=r"user 'u1': text is empty"):
        verbalise.user_texts(data.users, data.interactions, data.items, 3, "  ")
    with pytest.raises(ValueError, match="n_recent"):
        verbalise.user_texts(data.users, data.interactions, data.items, 0)


def test_next_item_and_holdout_pairs(tiny: tuple[HeteroGraph, ingest.Dataset]) -> None:
    graph, data = tiny
    texts = verbalise.item_texts(data.items, graph)
    train = data.interactions
    pairs = next_item_pairs(train, data.users, data.items, texts, n_recent=2)
    assert len(pairs) == 6 * 4  # five interactions per user: positions 1..4 become targets
    assert pairs.queries[0] == "User aged 15, male, student. Recently watched: Alpha One (1990)."
    assert pairs.targets[:4].tolist() == [1, 2, 3, 4] and pairs.seen[3].tolist() == [0, 1, 2, 3]
    latest = next_item_pairs(train, data.users, data.items, texts, max_per_user=1)
    assert len(latest) == 6 and latest.targets[0] == 4
    early, late = train[train.timestamp < 1030], train[train.timestamp >= 1030]
    held = holdout_pairs(early, late, data.users, data.items, texts, n_recent=5)
    assert held.targets[0] == 3 and held.seen[0].tolist() == [0, 1, 2]  # u1's next is i4
    assert held.fingerprint() != pairs.fingerprint()

    # Queries are verbalised when read: each is the user's text over the history before its target.
    titles = verbalise.item_titles(data.items)
    rows = {int(r["user"]): r for r in data.users.to_dict("records")}
    sequences = verbalise.histories(train)
    spans = [(u, t) for u, seq in sequences.items() for t in range(1, len(seq))]
    assert list(pairs.queries) == [
        verbalise.user_text(rows[u], sequences[u][:t], titles, 2, verbalise.DEFAULT_USER_TEMPLATE)
        for u, t in spans
    ]
    assert [s.tolist() for s in pairs.seen] == [sequences[u][:t] for u, t in spans]
    assert pairs.queries[-2:] == [pairs.queries[len(pairs) - 2], pairs.queries[len(pairs) - 1]]
    assert pairs.subset(np.array([5, 1])).queries == [pairs.queries[5], pairs.queries[1]]
    # The fingerprint follows what the queries are made from, without writing them all.
    again = next_item_pairs(train, data.users, data.items, texts, n_recent=2)
    assert again.fingerprint() == pairs.fingerprint()
    assert (
        next_item_pairs(train, data.users, data.items, texts, n_recent=3).fingerprint() != pairs.fingerprint()
    )
    assert next_item_pairs(train.iloc[1:], data.users, data.items, texts, n_recent=2).fingerprint() != (
        pairs.fingerprint()
    )
    with pytest.raises(ValueError, match="unknown field"):
        next_item_pairs(train, data.users, data.items, texts, template="{nope}")


# ---------------------------------------------------------------- encoder


def test_embeddings_normalised_deterministic_and_in_input_order(encoder: Encoder, model_dir: Path) -> None:
    texts = ["alpha one", "beta two gamma three delta four", "red", "green blue yellow black white", "fig"]
    out = encoder.encode(texts)
    assert out.dtype == np.float32 and out.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)  # length-sorted batches, input order out
    order = [3, 0, 4, 2, 1]
    np.testing.assert_allclose(encoder.encode([texts[k] for k in order]), out[order], atol=1e-5)
    # The same seed gives the same weights, fingerprint and embeddings.
    again = make_model(model_dir.parent / "same-seed")
    twin = Encoder(again, max_length=32, batch_size=3, threads=1)
    assert twin.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(twin.encode(texts), out)


def test_cache_hits_and_invalidation(encoder: Encoder, model_dir: Path, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    texts = ["alpha one", "beta two", "gamma three", "alpha one"]
    first, hits = encode_cached(encoder, texts, cache)
    assert hits == 0 and cache.size(encoder.fingerprint, encoder.max_length) == 3
    second, hits = encode_cached(encoder, texts, cache)
    assert hits == 4
    np.testing.assert_array_equal(first, second)
    reopened, hits = encode_cached(encoder, texts, EmbeddingCache(tmp_path / "cache"))  # from disk
    assert hits == 4
    np.testing.assert_array_equal(first, reopened)
    changed, hits = encode_cached(encoder, ["alpha one", "beta two", "delta four", "alpha one"], cache)
    assert hits == 3
    assert not np.allclose(changed[2], first[2])
    np.testing.assert_allclose(changed[2], encoder.encode(["delta four"])[0], atol=1e-6)
    other = Encoder(make_model(model_dir.parent / "other-seed", seed=1), max_length=32, threads=1)
    assert other.fingerprint != encoder.fingerprint
    _, hits = encode_cached(other, texts, cache)
    assert hits == 0
    shorter = Encoder(encoder.ref, max_length=16, threads=1)
    _, hits = encode_cached(shorter, texts, cache)
    assert hits == 0  # max_length is part of the key
    assert not list((tmp_path / "cache").rglob(".*tmp*"))  # atomic writes leave no temporaries


def test_cold_start_item_and_user(
    encoder: Encoder, tiny: tuple[HeteroGraph, ingest.Dataset], tmp_path: Path
) -> None:
    graph, data = tiny
    new_item = {
        "item": 8,
        "item_id": "i9",
        "movie_title": "Pink Apple",
        "release_year": "1997",
        "class": "Comedy",
    }
    items = pd.concat([data.items, pd.DataFrame([new_item])], ignore_index=True)
    texts, vectors = encode_items(encoder, items, graph, cache=EmbeddingCache(tmp_path / "c"))
    assert texts[8] == "Pink Apple (1997). Genres: Comedy."  # absent from the graph and from training
    assert np.isfinite(vectors).all() and vectors.shape == (9, 32)
    _, again = encode_items(encoder, items, graph)
    np.testing.assert_allclose(again[8], vectors[8], atol=1e-6)
    users = pd.concat(
        [data.users, pd.DataFrame([{"user": 6, "user_id": "u7", "age": "30", "gender": "F"}])],
        ignore_index=True,
    )
    user_texts, user_vectors = encode_users(encoder, users, data.interactions, items, n_recent=2)
    assert user_texts[6] == "User aged 30, female, unknown. Recently watched: nothing yet."
    assert np.isfinite(user_vectors).all()
    save_embeddings(tmp_path / "emb", list(items.item_id), vectors, {"model": "tiny"})
    ids, loaded, meta = load_embeddings(tmp_path / "emb")
    assert ids[8] == "i9" and meta["dim"] == 32
    np.testing.assert_array_equal(loaded, vectors)


def test_encoder_errors(encoder: Encoder, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no tokenizer files"):
        resolve_model(str(bare))
    with pytest.raises(ModelError, match="no tokenizer files"):
        Encoder(ModelRef("bare", bare, "x", "local"))
    with pytest.raises(ModelError, match="neither a local directory nor in the Hugging Face cache"):
        resolve_model("nobody/no-such-model-xyz")
    with pytest.raises(ValueError, match="empty list"):
        encoder.encode([])
    with pytest.raises(ValueError, match="text 1 is empty or whitespace"):
        encoder.encode(["alpha", "   "])
    with pytest.raises(ValueError, match="text 0 is empty"):
        encode_cached(encoder, [""], EmbeddingCache(tmp_path / "c"))
    with pytest.raises(ValueError, match="max_length"):
        Encoder(encoder.ref, max_length=0)
    with pytest.raises(ModelError, match="exceeds the model's 128 positions"):
        Encoder(encoder.ref, max_length=512)


def test_checksum_mismatch_is_reported(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "package-model"
    shutil.copytree(model_dir, copy)
    with pytest.raises(ModelError, match="does not match the pinned"):
        resolve_model("default", package_dir=copy)
    good = resolve_model("default", package_dir=copy, expected_sha256=_sha(copy / "model.safetensors"))
    assert good.source == "package"
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # one byte changed
    with pytest.raises(ModelError, match="does not match the pinned"):
        resolve_model("default", package_dir=copy, expected_sha256=good.fingerprint)


def _sha(path: Path) -> str:
    from components.core.storage import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------- fine-tuning

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]
FRUITS = ["apple", "pear", "plum", "fig", "alpha", "beta", "gamma", "delta"]


def easy_pairs() -> PairSet:
    """Each query names its target word: pairing them needs only lexical overlap."""
    candidates = [f"{c} {f}" for c, f in zip(COLOURS, FRUITS, strict=True)]
    queries = [f"user likes {c} {c}" for c in COLOURS]
    n = len(queries)
    return PairSet(queries, np.arange(n), candidates, np.arange(n), [np.empty(0, dtype=np.int64)] * n)


CFG = FinetuneConfig.from_section(
    FinetuneSection(
        r=4,
        alpha=8,
        lr=2e-2,
        steps=8,
        batch_size=8,
        temperature=0.1,
        warmup_steps=1,
        max_length=16,
        checkpoint_every=4,
    ),
    seed=7,
)


@pytest.fixture(scope="module")
def tuned(ref: ModelRef, tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneResult, list]:
    logged: list[tuple[str, float, int]] = []
    out = tmp_path_factory.mktemp("finetune")
    result = finetune(ref, easy_pairs(), CFG, out, lambda n, v, s: logged.append((n, v, s)))
    return result, logged


def test_finetune_reduces_loss_and_reports(tuned: tuple[FinetuneResult, list]) -> None:
    result, logged = tuned
    assert len(result.losses) == CFG.steps
    assert result.losses[-1] < result.losses[0] - 0.1
    assert 0 < result.trainable_params < result.total_params / 10
    assert result.wall_s > 0
    assert [n for n, _, s in logged if s == 0] == ["finetune/loss", "finetune/lr"]
    assert [v for n, v, _ in logged if n == "finetune/loss"] == result.losses
    assert result.learning_rates[0] == pytest.approx(CFG.lr * lr_factor(0, CFG))
    meta = (result.adapter_dir / "finetune.json").read_text()
    assert '"r": 4' in meta and '"temperature": 0.1' in meta
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.adapter_dir.parent / "checkpoints" / "step-000004" / "state.pt").is_file()


def test_adapter_round_trip_and_effect(
    tuned: tuple[FinetuneResult, list], ref: ModelRef, encoder: Encoder
) -> None:
    result, _ = tuned
    pairs = easy_pairs()
    texts = pairs.queries + pairs.candidates
    in_memory = result.encoder().encode(texts)
    loaded = Encoder(ref, max_length=CFG.max_length, threads=1, adapter_dir=result.adapter_dir)
    np.testing.assert_allclose(loaded.encode(texts), in_memory, atol=1e-6)
    assert result.fingerprint == loaded.fingerprint
    by_parent = Encoder(ref, max_length=CFG.max_length, threads=1, adapter_dir=result.adapter_dir.parent)
    assert by_parent.fingerprint == loaded.fingerprint != ref.fingerprint
    frozen = Encoder(ref, max_length=CFG.max_length, threads=1)
    assert not np.allclose(frozen.encode(texts), in_memory, atol=1e-3)
    before, after = validation_signal(frozen, pairs, k=3), validation_signal(loaded, pairs, k=3)
    assert set(after) == {"mrr", "recall@3", "mean_rank", "n_pairs"} and after["n_pairs"] == 8
    assert after["mrr"] >= before["mrr"]


def test_resume_reproduces_uninterrupted_run(
    tuned: tuple[FinetuneResult, list], ref: ModelRef, tmp_path: Path
) -> None:
    result, _ = tuned

    def crash_at_5(name: str, value: float, step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        finetune(ref, easy_pairs(), CFG, tmp_path / "run", crash_at_5)
    assert not (tmp_path / "run" / "adapter").exists()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    resumed = finetune(ref, easy_pairs(), CFG, tmp_path / "run", resume_from=checkpoint)
    assert resumed.resumed_from_step == 4 and resumed.losses == result.losses
    want = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    sparser = dataclasses.replace(CFG, checkpoint_every=0)  # cadence is not part of the run
    assert (
        finetune(ref, easy_pairs(), sparser, tmp_path / "b", resume_from=checkpoint).losses == result.losses
    )
    other = dataclasses.replace(CFG, lr=1e-3)
    with pytest.raises(ValueError, match="different config"):
        finetune(ref, easy_pairs(), other, tmp_path / "other", resume_from=checkpoint)


def test_finetune_config_is_the_section_plus_seed() -> None:
    for bad in ({"batch_size": 1}, {"warmup_steps": 9, "steps": 8}, {"rank": 8}, {"max_length": 1}):
        with pytest.raises(ValidationError):
            FinetuneSection.model_validate(bad)
    section = FinetuneSection()
    assert FinetuneConfig.from_section(section, 3).to_dict() == {
        **section.model_dump(exclude={"enabled", "max_pairs_per_user", "valid_users"}),
        "seed": 3,
    }
    assert lr_factor(0, CFG) == pytest.approx(0.5) and lr_factor(1, CFG) == pytest.approx(1.0)


# ---------------------------------------------------------------- retuning for the cold-item protocol


def test_retuned_encoder_never_sees_the_cold_items(
    ref: ModelRef, model_dir: Path, tiny: tuple[HeteroGraph, ingest.Dataset], tmp_path: Path
) -> None:
    """The cold protocol's fine-tune learns from pairs without the cold items; one adapter per input."""
    from components.core.config import TextConfig
    from components.text.retune import retuned_embeddings, training_pairs

    graph, data = tiny
    text = TextConfig.model_validate(
        {
            "model": str(model_dir),
            "max_length": 32,
            "threads": 1,
            "finetune": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "max_length": 32},
        }
    )
    cold = [1, 3]  # i2 "Beta Two" and i4
    kept = data.interactions[~data.interactions.item.isin(cold)]
    texts = verbalise.item_texts(data.items, graph)
    full = training_pairs(data.interactions, data.users, data.items, texts, text)
    pairs = training_pairs(kept, data.users, data.items, texts, text)
    assert set(full.targets.tolist()) & set(cold)  # the stage's pairs do hold them ...
    assert not set(pairs.targets.tolist()) & set(cold)  # ... the protocol's do not,
    assert not any("Beta Two" in q for q in pairs.queries)  # not even as a watched title
    assert any("Beta Two" in q for q in full.queries)

    adapters = tmp_path / "adapters"
    first = retuned_embeddings(ref, kept, data.users, data.items, graph, text, 7, adapters)
    assert not first.cached and first.n_pairs == len(pairs)
    assert first.item_vectors.shape == (len(data.items), 32) and first.profile_vectors.shape[0] == len(
        data.users
    )
    again = retuned_embeddings(ref, kept, data.users, data.items, graph, text, 7, adapters)
    assert again.cached and again.adapter_dir == first.adapter_dir  # a second variant reuses the fine-tune
    np.testing.assert_allclose(again.item_vectors, first.item_vectors, atol=1e-6)
    other = retuned_embeddings(ref, data.interactions, data.users, data.items, graph, text, 7, adapters)
    assert other.adapter_dir != first.adapter_dir and not other.cached
    assert sorted(p.name for p in adapters.iterdir()) == sorted(
        [first.adapter_dir.parent.name, other.adapter_dir.parent.name]
    )
