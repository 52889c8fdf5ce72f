"""ONNX export: a tiny FusionNet and a tiny random BERT exported, checked against torch, quantised.

Everything is built here (no dataset, no download): the scorer from random weights and a hand-made
feature bank, the encoder from a 2-layer BERT config with a word-level vocabulary, so the module
runs in a few seconds on two cores. The full MiniLM export runs in benchmarks/onnx_speed.py and in
the export stage.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
import torch

from components.bundle.export import (
    ENCODER_INPUTS,
    SCORER_INPUTS,
    SCORER_OUTPUTS,
    SKIP_FILE,
    ParityError,
    check_cosine,
    check_max_abs,
    check_relative,
    check_scorer_parity,
    cosine_rows,
    export_encoder,
    export_scorer,
    mean_cosine,
    parity_metric,
    quantise_int8,
    scorer_latency,
    write_skip,
)
from components.bundle.runtime import ENCODER_JSON, OnnxEncoder, OnnxScorer
from components.core.storage import read_json, write_json
from components.evaluation import protocol as evaluate
from components.model.features import CONSTANT, HISTORY, Channel, FeatureBank
from components.model.net import FusionNet, NetConfig
from components.model.recommender import MetarecRecommender
from components.text.encoder import Encoder, ModelRef

N_USERS, N_ITEMS, TEXT_DIM, N_OCC = 12, 30, 8, 4
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = [
    "Toy Story (1995). Genres: Animation Children's Comedy.",
    "GoldenEye. Genres: Action Adventure Thriller. Directed by the director of: Heat (1995), Collateral.",
    "Heat",
    "Four Rooms (1995). Genres: Thriller. Shares cast with: Toy Story, Heat, GoldenEye, Copycat.",
    "Copycat. Genres: Crime Drama Thriller.",
    "User aged 25-34, male, engineer. Recently watched: Heat, Copycat.",
    "Get Shorty (1995). Genres: Action Comedy Drama.",
]

torch.set_num_threads(1)


# ---------------------------------------------------------------- builders


def make_bank(rng: np.random.Generator) -> FeatureBank:
    """History-, attribute- and constant-sourced channels over random suffixes."""
    occupation = rng.integers(0, N_OCC, size=N_USERS)
    attributes = sp.csr_matrix(
        (np.ones(N_USERS, np.float32), (np.arange(N_USERS), occupation)), shape=(N_USERS, N_OCC)
    )
    channels = [
        Channel("co-watch", HISTORY, rng.random((N_ITEMS, N_ITEMS)).astype(np.float32), "metapath", "a|b"),
        Channel("occupation", "user.occupation", rng.random((N_OCC, N_ITEMS)).astype(np.float32), "metapath"),
        Channel("popularity", CONSTANT, rng.random((1, N_ITEMS)).astype(np.float32), "popularity"),
    ]
    values = {"user.occupation": [f"o{k}" for k in range(N_OCC)]}
    return FeatureBank(channels, N_ITEMS, {"user.occupation": attributes}, values)


def make_net(use_paths: bool = True, seed: int = 0) -> FusionNet:
    """A FusionNet with random weights (biases too, so no term is trivially zero) and a few cold items."""
    gen = torch.Generator().manual_seed(seed)
    item_text = torch.nn.functional.normalize(torch.randn(N_ITEMS, TEXT_DIM, generator=gen), dim=1)
    warm = torch.ones(N_ITEMS)
    warm[:3] = 0.0
    net = FusionNet(NetConfig(N_ITEMS, TEXT_DIM, 3, rank=4, use_paths=use_paths), item_text, warm, seed)
    with torch.no_grad():
        for param in (net.path_bias, net.text_user_bias, net.text_bias, net.id_bias):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        net.path_user.mul_(50.0)  # gates that differ visibly between users
        net.id_item.mul_(30.0)
        net.id_user.mul_(30.0)
    return net.eval()


def make_history(rng: np.random.Generator) -> sp.csr_matrix:
    return sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < 0.25).astype(np.float32))


def make_bert(directory: Path) -> Path:
    """A random 2-layer BERT with a word-level tokenizer covering TEXTS, saved in ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    directory.mkdir(parents=True, exist_ok=True)
    words = sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(TEXTS).lower())))
    vocab = SPECIAL + [w for w in words if w not in {s.lower() for s in SPECIAL}]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    vocab_file = directory.parent / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary as `vocab=` (`vocab_file=` is silently ignored).
    BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def bank(rng: np.random.Generator) -> FeatureBank:
    return make_bank(rng)


@pytest.fixture(scope="module")
def net() -> FusionNet:
    return make_net()


@pytest.fixture(scope="module")
def scorer_path(net: FusionNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_scorer(net, tmp_path_factory.mktemp("scorer") / "scorer.onnx")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    model_dir = make_bert(tmp_path_factory.mktemp("bert") / "model")
    # batch_size 3 over 7 texts: batches of different lengths, so padding is exercised.
    return Encoder(ModelRef("tiny", model_dir, "f" * 64, "local"), max_length=16, batch_size=3, threads=1)


@pytest.fixture(scope="module")
def encoder_files(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("encoder")
    pad_id = int(encoder.tokenizer.pad_token_id)
    fp32 = export_encoder(encoder.model, out / "encoder.fp32.onnx", pad_id)
    int8 = quantise_int8(fp32, out / "encoder.onnx", out / "work")
    encoder.tokenizer.save_pretrained(str(out / "tokenizer"))
    write_json(out / ENCODER_JSON, {"max_length": 16, "pad_id": pad_id})  # as a bundle holds them
    return {"fp32": fp32, "int8": int8, "tokenizer": out / "tokenizer" / "tokenizer.json"}


# ---------------------------------------------------------------- scorer


@pytest.mark.parametrize("batch", [1, 5])
def test_scorer_onnx_matches_torch(
    net: FusionNet, bank: FeatureBank, scorer_path: Path, rng: np.random.Generator, batch: int
) -> None:
    history = make_history(rng)
    users = np.sort(rng.choice(N_USERS, size=batch, replace=False))
    profile = rng.standard_normal((N_USERS, TEXT_DIM)).astype(np.float32)
    features = bank.rows(history[users], users)
    assert np.abs(features[:, 1]).sum() > 0  # the attribute channel reaches the export
    scorer = OnnxScorer(scorer_path, bank, profile)
    scores, gates = scorer(history[users].toarray(), profile[users], features)
    assert scores.shape == (batch, N_ITEMS) and gates.shape == (batch, 3)
    assert np.array_equal(scorer.score(users, history), scores)  # the evaluate protocol's path

    model = MetarecRecommender(net, bank, profile, history)
    expected = model.score(users, history)
    assert np.max(np.abs(scores - expected)) <= 1e-4
    hist_t, prof_t = torch.from_numpy(history[users].toarray()), torch.from_numpy(profile[users])
    with torch.no_grad():
        user = net.user_vector(hist_t, prof_t)
        want_gates = torch.nn.functional.softplus(net.path_bias + user @ net.path_user).numpy()
    assert np.max(np.abs(gates - want_gates)) <= 1e-4
    assert gates.std(axis=0).max() > 1e-3 or batch == 1  # really per user, not a constant
    assert check_scorer_parity(net, scorer, history[users].toarray(), profile[users], features, 1e-4) <= 1e-4


def test_scorer_graph_has_named_dynamic_batch(scorer_path: Path) -> None:
    graph = onnx.load(str(scorer_path)).graph
    assert [i.name for i in graph.input] == list(SCORER_INPUTS)
    assert [o.name for o in graph.output] == list(SCORER_OUTPUTS)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {
        "history": ["batch", N_ITEMS],
        "profile": ["batch", TEXT_DIM],
        "features": ["batch", 3, N_ITEMS],
    }
    for output in graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_gates_are_zero_without_paths(bank: FeatureBank, rng: np.random.Generator, tmp_path: Path) -> None:
    net = make_net(use_paths=False)
    history = make_history(rng)
    users = np.arange(4)
    profile = rng.standard_normal((4, TEXT_DIM)).astype(np.float32)
    scorer = OnnxScorer(export_scorer(net, tmp_path / "scorer.onnx"), bank, profile)
    features = bank.rows(history[users], users)
    scores, gates = scorer(history[users].toarray(), profile, features)
    assert np.all(gates == 0.0) and gates.shape == (4, 3)
    assert check_scorer_parity(net, scorer, history[users].toarray(), profile, features, 1e-4) <= 1e-4


def test_scorer_parity_failure_is_a_clear_error(
    bank: FeatureBank, rng: np.random.Generator, tmp_path: Path
) -> None:
    net = make_net(seed=3)
    history = make_history(rng)
    users = np.arange(3)
    profile = rng.standard_normal((3, TEXT_DIM)).astype(np.float32)
    scorer = OnnxScorer(export_scorer(net, tmp_path / "scorer.onnx"), bank, profile)
    features = bank.rows(history[users], users)
    with torch.no_grad():
        net.id_bias.add_(0.01)  # the torch model moves on; the exported file no longer matches it
    with pytest.raises(
        ParityError, match=r"scorer scores: ONNX vs torch max-abs difference 0\.01 > tolerance"
    ):
        check_scorer_parity(net, scorer, history[users].toarray(), profile, features, 1e-3)
    with pytest.raises(ParityError, match="shape"):
        check_max_abs("x", np.zeros((2, 3)), np.zeros((3, 2)), 1.0)
    with pytest.raises(ParityError, match="max-abs"):
        check_max_abs("x", np.zeros(3), np.full(3, np.nan), 1.0)


def test_onnx_scorer_evaluates_like_torch(
    net: FusionNet, bank: FeatureBank, scorer_path: Path, rng: np.random.Generator
) -> None:
    history = make_history(rng)
    rest = sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < 0.1).astype(np.float32) - history.multiply(1.0))
    rest.data = np.maximum(rest.data, 0)
    rest.eliminate_zeros()
    valid = sp.csr_matrix(rest.multiply(rng.random((N_USERS, N_ITEMS)) < 0.5))
    test = sp.csr_matrix(rest - valid)
    data = evaluate.EvalData(history, valid, test)
    profile = rng.standard_normal((N_USERS, TEXT_DIM)).astype(np.float32)
    torch_model = MetarecRecommender(net, bank, profile, history)
    onnx_model = OnnxScorer(scorer_path, bank, profile, 2)
    ks = [2, 5]
    want = evaluate.evaluate(torch_model, data, "test", ks, [5], block_size=4)["overall"]
    got = evaluate.evaluate(onnx_model, data, "test", ks, [5], block_size=4)["overall"]
    name = parity_metric(ks)
    assert name == "ndcg@2" and parity_metric([10, 20]) == "ndcg@10"
    assert check_relative(name, want[name], got[name], 0.01) <= 1e-6
    with pytest.raises(
        ParityError,
        match=r"test ndcg@10: ONNX 0\.19000 vs torch 0\.20000, relative difference 0\.0500 > 0\.01",
    ):
        check_relative("test ndcg@10", 0.2, 0.19, 0.01)
    with pytest.raises(ValueError, match="history"):
        onnx_model.score(np.arange(2))


def test_scorer_latency_reports_percentiles(
    bank: FeatureBank, scorer_path: Path, rng: np.random.Generator
) -> None:
    history = make_history(rng)
    users = np.asarray([0])
    profile = rng.standard_normal((1, TEXT_DIM)).astype(np.float32)
    feeds = (history[users].toarray(), profile, bank.rows(history[users], users))
    scorer = OnnxScorer(scorer_path, bank, profile)
    out = scorer_latency(scorer, *feeds, runs=50, warmup=5)
    assert 0 < out["p50_ms"] <= out["p99_ms"] and out["mean_ms"] > 0
    best = scorer_latency(scorer, *feeds, runs=50, warmup=0, rounds=3)
    assert 0 < best["p50_ms"] <= best["p99_ms"]
    with pytest.raises(ValueError, match="positive"):
        scorer_latency(scorer, *feeds, runs=10, rounds=0)


# ---------------------------------------------------------------- encoder


def test_encoder_fp32_onnx_matches_torch(encoder: Encoder, encoder_files: dict[str, Path]) -> None:
    graph = onnx.load(str(encoder_files["fp32"])).graph
    assert [i.name for i in graph.input] == list(ENCODER_INPUTS)
    assert [o.name for o in graph.output] == ["embedding"]
    for tensor in graph.input:
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor.type.tensor_type.shape.dim] == ["batch", "sequence"]
    pad_id = int(encoder.tokenizer.pad_token_id)
    onnx_encoder = OnnxEncoder(encoder_files["fp32"], encoder_files["tokenizer"], 16, pad_id, batch_size=3)
    # Same token ids from the `tokenizers` library as from the transformers tokenizer (truncation too),
    # right-padded with the padding id.
    hf = encoder.tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]
    encoded = onnx_encoder.tokenizer.encode_batch(TEXTS)
    assert [e.ids[: sum(e.attention_mask)] for e in encoded] == hf
    assert {e.ids[-1] for e in encoded if e.attention_mask[-1] == 0} == {pad_id}
    assert max(len(r) for r in hf) == 16 and min(len(r) for r in hf) < 8  # truncated and padded rows

    want = encoder.encode(TEXTS)
    got = onnx_encoder.encode(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 32)
    assert check_max_abs("encoder embeddings", want, got, 1e-4) <= 1e-4
    # One text at a time (batch 1, no padding) gives the same vectors as the padded batches.
    single = np.vstack([onnx_encoder.encode([t]) for t in TEXTS])
    assert np.max(np.abs(single - want)) <= 1e-4


def test_int8_encoder_runs_and_is_close(encoder: Encoder, encoder_files: dict[str, Path]) -> None:
    fp32_size = encoder_files["fp32"].stat().st_size
    model = onnx.load(str(encoder_files["int8"]))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    assert encoder_files["int8"].stat().st_size < fp32_size
    pad_id = int(encoder.tokenizer.pad_token_id)
    int8 = OnnxEncoder(encoder_files["int8"], encoder_files["tokenizer"], 16, pad_id, batch_size=3)
    got = int8.encode(TEXTS)
    # The bundle's loader (what the serving engine calls) reads the same settings from encoder.json.
    assert np.array_equal(
        OnnxEncoder.from_bundle(encoder_files["int8"].parent, batch_size=3).encode(TEXTS), got
    )
    assert got.shape == (len(TEXTS), 32) and np.all(np.isfinite(got))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = mean_cosine(encoder.encode(TEXTS), got)
    assert 0.9 < cosine <= 1.0 + 1e-6


def test_int8_cosine_check() -> None:
    ref = np.eye(3, dtype=np.float32)
    assert check_cosine(ref, ref * 2, 0.99) == pytest.approx(1.0)
    with pytest.raises(
        ParityError, match=r"int8 encoder: mean cosine to fp32 embeddings -1\.0000 < minimum 0\.99"
    ):
        check_cosine(ref, -ref, 0.99)


def test_int8_cosine_rows_are_all_texts_up_to_the_cap_then_a_seeded_sample() -> None:
    assert cosine_rows(1682, 4096, 42).tolist() == list(range(1682))  # ml-100k: every item text
    sample = cosine_rows(20_000, 4096, 42)
    assert sample.size == 4096 and np.unique(sample).size == 4096 and np.all(np.diff(sample) > 0)
    assert sample[0] >= 0 and sample[-1] < 20_000
    assert np.array_equal(sample, cosine_rows(20_000, 4096, 42))
    assert not np.array_equal(sample, cosine_rows(20_000, 4096, 43))


def test_skip_marker(tmp_path: Path) -> None:
    write_skip(tmp_path, "pop")
    note = read_json(tmp_path / SKIP_FILE)
    assert note["skipped"] is True and note["model"] == "pop"
    assert "only the metarec fusion model" in note["reason"]


# ---------------------------------------------------------------- stage wiring


def _workspace(tmp_path: Path, model: str) -> Path:
    ws = tmp_path / "ws"
    (ws / "models" / "bundle").mkdir(parents=True)
    (ws / "models" / "bundle" / "previous.txt").write_text("the last good bundle\n", encoding="utf-8")
    (ws / "params.yaml").write_text(f"model:\n  name: {model}\n", encoding="utf-8")
    return ws


def test_export_stage_skips_baselines(tmp_path: Path) -> None:
    from components.stages import run_stage

    ws = _workspace(tmp_path, "pop")
    run_stage("export", ws)
    bundle = ws / "models" / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == [SKIP_FILE]
    assert read_json(bundle / SKIP_FILE)["model"] == "pop"


def test_export_stage_failure_keeps_previous_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.bundle import export
    from components.stages import run_stage

    def failing(paths: object, cfg: object, dest: Path, work_dir: Path) -> dict[str, object]:
        (dest / "scorer.onnx").write_bytes(b"half-written")
        raise ParityError("int8 encoder: mean cosine to fp32 embeddings 0.9000 < minimum 0.99")

    monkeypatch.setattr(export, "export_bundle", failing)
    ws = _workspace(tmp_path, "metarec")
    with pytest.raises(ParityError, match="mean cosine"):
        run_stage("export", ws)
    bundle = ws / "models" / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["previous.txt"]
    assert not [p.name for p in (ws / "models").iterdir() if p.name != "bundle"]  # no scratch left


def test_scorer_with_every_option_exports_with_parity(
    bank: FeatureBank, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Language gates, the text→ID map and the metadata bias are plain tensors: ONNX matches torch."""
    gen = torch.Generator().manual_seed(5)
    item_text = torch.nn.functional.normalize(torch.randn(N_ITEMS, TEXT_DIM, generator=gen), dim=1)
    channel_text = torch.nn.functional.normalize(torch.randn(3, TEXT_DIM, generator=gen), dim=1)
    attributes = (torch.rand(N_ITEMS, 4, generator=gen) < 0.4).float()
    warm = torch.ones(N_ITEMS)
    warm[:3] = 0.0
    cfg = NetConfig(N_ITEMS, TEXT_DIM, 3, rank=4, gates="both", text_to_id=True, n_attributes=4)
    net = FusionNet(cfg, item_text, warm, 0, channel_text, attributes)
    with torch.no_grad():
        for param in (net.gate_history, net.gate_profile, net.attribute_bias):
            param.copy_(torch.randn(param.shape, generator=gen) * 3.0)
        net.id_from_text.mul_(100.0)
    net.eval()
    history = make_history(rng)
    users = np.arange(5)
    profile = rng.standard_normal((N_USERS, TEXT_DIM)).astype(np.float32)
    features = bank.rows(history[users], users)
    scorer = OnnxScorer(export_scorer(net, tmp_path / "scorer.onnx"), bank, profile)
    scores, gates = scorer(history[users].toarray(), profile[users], features)
    expected = MetarecRecommender(net, bank, profile, history).score(users, history)
    assert np.max(np.abs(scores - expected)) <= 1e-4
    with torch.no_grad():
        user = net.user_vector(torch.from_numpy(history[users].toarray()), torch.from_numpy(profile[users]))
        want = torch.nn.functional.softplus(net.gate_logits(user)).numpy()
    assert np.max(np.abs(gates - want)) <= 1e-4
