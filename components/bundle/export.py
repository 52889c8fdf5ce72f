"""Export the fusion scorer and the text encoder to ONNX, check parity, write the serving bundle.

The bundle (``models/bundle``) holds everything serving needs and nothing it must unpickle:

* ``encoder.onnx``: the text encoder (LoRA adapter merged), dynamic int8, outputting the mean-pooled,
  L2-normalised ``embedding`` of ``input_ids``/``attention_mask`` (int64, ``[batch, seq]``), as
  :meth:`components.text.encoder.Encoder.encode` does; ``tokenizer/`` (its ``tokenizer.json`` loads with
  the ``tokenizers`` library alone) and ``encoder.json`` (max_length, input names, padding id).
* ``scorer.onnx``: the fp32 :class:`~components.model.net.FusionNet` with inputs ``history``
  ``[batch, N]``, ``profile`` ``[batch, D]``, ``features`` ``[batch, C, N]`` and outputs ``scores``
  ``[batch, N]`` and ``gates`` ``[batch, C]`` (the per-user channel weights, for explanations).
* The model directory's ``model.json``, ``features.{json,npz}`` and ``profiles.npz``; the id tables
  ``items.parquet`` (item, item_id, title) and ``users.parquet``; ``metapaths.json`` and ``graph/`` (for
  explanations); ``item_embeddings.npz`` (the scorer's item text table, the drift reference).
* ``bundle.json``, written last by :func:`components.bundle.format.write_manifest`.

Parity is checked before anything is kept, and a violation raises :class:`ParityError`, failing the
stage with the previous bundle untouched: fp32 ONNX against torch (max-abs difference of scores, gates
and embeddings), int8 embeddings against the encode stage's (mean cosine over the item texts, at most
``export.cosine_texts`` of them), and the test NDCG@10 of the ONNX scorer against the torch model's in
``metrics.json`` (relative difference).
Every ONNX file is run through :mod:`components.bundle.runtime`, the code that serves it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.bundle.format import MODEL_FILES, write_manifest
from components.bundle.runtime import (
    ENCODER_JSON,
    ENCODER_ONNX,
    SCORER_INPUTS,
    SCORER_ONNX,
    SCORER_OUTPUTS,
    TOKENIZER_DIR,
    OnnxEncoder,
    OnnxScorer,
)
from components.core.parallel import Blocks
from components.core.storage import read_json, write_json
from components.evaluation import protocol as evaluate

if TYPE_CHECKING:  # the stage helpers are imported where they are used
    from components.core.config import Config
    from components.core.workspace import Paths
    from components.model.net import FusionNet

OPSET = 17
ITEM_EMBEDDINGS = "item_embeddings.npz"
SKIP_FILE = "skipped.json"
# Encoder.encode feeds input_ids and attention_mask only (BERT then uses token type 0 everywhere), so
# the exported graph takes exactly these two and serving never has to produce token type ids.
ENCODER_INPUTS = ("input_ids", "attention_mask")


class ParityError(RuntimeError):
    """An exported model whose outputs differ from the torch model's beyond tolerance."""


class PooledEncoder(nn.Module):
    """A transformer body plus the encoder's mean pooling and L2 normalisation, for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(batch, dim)`` of right-padded token ids."""
        from components.text.encoder import embed

        # The same function Encoder.encode uses, so the exported math cannot drift from it.
        return embed(self.model, {"input_ids": input_ids, "attention_mask": attention_mask})


class ScorerWithGates(nn.Module):
    """FusionNet's scores plus its per-user channel weights (zeros when paths are switched off)."""

    def __init__(self, net: FusionNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, history: torch.Tensor, profile: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``scores`` ``(B, N)`` and ``gates`` ``(B, C)`` for a batch of users."""
        scores = self.net(history, profile, features)
        if self.net.cfg.use_paths and self.net.cfg.n_channels:
            user = self.net.user_vector(history, profile)
            gates = nn.functional.softplus(self.net.gate_logits(user))
        else:
            # Shaped from ``features`` so the input stays in the graph: the exporter drops unused inputs,
            # and serving feeds the same three inputs whatever the ablation switches.
            gates = torch.zeros_like(features[:, :, 0])
        return scores, gates


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> Path:
    """Trace ``module`` on ``args`` and write it as ONNX to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns on every Python-level shape read; the parity checks are what guard the result.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # Raised for transformers' padding-mask lookup, whose indices come from arange (never negative).
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        # The legacy TorchScript exporter, pinned: torch 2.13 defaults to the dynamo exporter, which
        # imports onnxscript (not installed here: dynamo=True fails with ModuleNotFoundError), while the
        # traced opset-17 graph is the one verified end to end, through ORT's quantisation
        # pre-processing and the parity checks (docs/benchmarks.md; torch 2.13, onnxruntime 1.31).
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,  # folds the item-side products (item text @ A, masked IDs) once
            dynamo=False,
        )
    return path


def export_scorer(net: FusionNet, path: Path, opset: int = OPSET) -> Path:
    """Export FusionNet (with its gates) to ONNX, fp32, with a dynamic batch axis."""
    cfg = net.cfg
    gen = torch.Generator().manual_seed(0)
    # Two users, so the tracer cannot mistake the batch size for a constant 1.
    history = (torch.rand(2, cfg.n_items, generator=gen) < 0.1).float()
    profile = torch.randn(2, cfg.text_dim, generator=gen)
    features = torch.rand(2, cfg.n_channels, cfg.n_items, generator=gen)
    axes = {name: {0: "batch"} for name in (*SCORER_INPUTS, *SCORER_OUTPUTS)}
    return _export(
        ScorerWithGates(net), (history, profile, features), path, SCORER_INPUTS, SCORER_OUTPUTS, axes, opset
    )


def export_encoder(model: nn.Module, path: Path, pad_id: int = 0, opset: int = OPSET) -> Path:
    """Export a transformer body with mean pooling + L2 norm to ONNX, fp32, dynamic batch and sequence.

    Args:
        model: A Hugging Face encoder body (adapter already merged), e.g. ``Encoder(...).model``.
        path: Where to write the ONNX file.
        pad_id: The tokenizer's padding id, used in the tracing input.
        opset: ONNX opset.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 100))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(5, vocab - 1), vocab, (2, 8), generator=gen)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    # The second row is padded: transformers drops the attention mask when it is all ones, and a
    # trace taken without padding would bake that shortcut in and mis-pool every padded batch.
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = pad_id
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "embedding": {0: "batch"},
    }
    return _export(
        PooledEncoder(model), (input_ids, attention_mask), path, ENCODER_INPUTS, ("embedding",), axes, opset
    )


def quantise_int8(fp32: Path, dest: Path, work_dir: Path) -> Path:
    """Optimise and quantise an exported model (the encoder) to dynamic int8, weights per channel.

    ``quant_pre_process`` (ONNX Runtime graph optimisation and shape inference) runs first, as ONNX
    Runtime recommends; its symbolic shape inference cannot resolve the tracer's dynamic sequence axis,
    so only the ONNX shape inference runs. Per-channel weight scales keep the embeddings' mean cosine
    to fp32 above 0.99 on MiniLM (per-tensor scales give ~0.965).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work_dir.mkdir(parents=True, exist_ok=True)
    pre = work_dir / f"{Path(dest).stem}.pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(dest), weight_type=QuantType.QInt8, per_channel=True)
    return Path(dest)


def check_max_abs(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> float:
    """Return the max-abs difference of two arrays, raising :class:`ParityError` above ``tolerance``."""
    if reference.shape != candidate.shape:
        raise ParityError(f"{name}: ONNX output shape {candidate.shape} != torch {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)), initial=0.0))
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(f"{name}: ONNX vs torch max-abs difference {diff:.3g} > tolerance {tolerance:g}")
    return diff


def check_scorer_parity(
    net: FusionNet,
    scorer: OnnxScorer,
    history: np.ndarray,
    profile: np.ndarray,
    features: np.ndarray,
    tolerance: float,
) -> float:
    """Max-abs difference of scores and gates between the ONNX scorer and torch (raises above tolerance)."""
    with torch.no_grad():
        scores, gates = ScorerWithGates(net.eval())(
            torch.from_numpy(np.asarray(history, np.float32)),
            torch.from_numpy(np.asarray(profile, np.float32)),
            torch.from_numpy(np.asarray(features, np.float32)),
        )
    onnx_scores, onnx_gates = scorer(history, profile, features)
    return max(
        check_max_abs("scorer scores", scores.numpy(), onnx_scores, tolerance),
        check_max_abs("scorer gates", gates.numpy(), onnx_gates, tolerance),
    )


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    a = reference.astype(np.float64)
    b = candidate.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))


def check_cosine(reference: np.ndarray, candidate: np.ndarray, minimum: float) -> float:
    """Mean cosine of int8 against fp32 embeddings, raising :class:`ParityError` below ``minimum``."""
    value = mean_cosine(reference, candidate)
    if not value >= minimum:
        raise ParityError(f"int8 encoder: mean cosine to fp32 embeddings {value:.4f} < minimum {minimum:g}")
    return value


def cosine_rows(n_texts: int, cap: int, seed: int) -> np.ndarray:
    """Item rows the int8 cosine is judged on: all of them, or a seeded sample of ``cap`` beyond that.

    Its own generator, so the sample does not move the other parity draws.
    """
    if n_texts <= cap:
        return np.arange(n_texts)
    return np.sort(np.random.default_rng([seed, 8]).choice(n_texts, size=cap, replace=False))


def check_relative(name: str, reference: float, candidate: float, maximum: float) -> float:
    """Relative difference ``|candidate - reference| / reference``, raising above ``maximum``."""
    diff = abs(candidate - reference) / abs(reference) if reference else abs(candidate - reference)
    if not diff <= maximum:
        raise ParityError(
            f"{name}: ONNX {candidate:.5f} vs torch {reference:.5f}, relative difference {diff:.4f} "
            f"> {maximum:g}"
        )
    return diff


def scorer_latency(
    scorer: OnnxScorer,
    history: np.ndarray,
    profile: np.ndarray,
    features: np.ndarray,
    runs: int = 300,
    warmup: int = 20,
    rounds: int = 1,
) -> dict[str, float]:
    """p50/p99/mean milliseconds of the ONNX scorer on one fixed batch (feature computation excluded).

    With ``rounds`` > 1 the ``runs`` are timed that many times and the round with the lowest p99 is
    reported: on a shared machine a burst of someone else's work lands in one round, not in all.
    """
    for _ in range(warmup):
        scorer(history, profile, features)
    if rounds < 1 or runs < 1:
        raise ValueError(f"runs and rounds must be positive, got {runs} and {rounds}")
    results = []
    for _ in range(rounds):
        times = np.empty(runs)
        for r in range(runs):
            start = time.perf_counter()
            scorer(history, profile, features)
            times[r] = time.perf_counter() - start
        ms = times * 1000.0
        results.append(
            {
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()),
            }
        )
    return min(results, key=lambda result: result["p99_ms"])


def file_mb(path: Path) -> float:
    """Size of a file, or of every file under a directory, in MiB."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 2**20


def parity_metric(ks: Sequence[int]) -> str:
    """The NDCG cut-off the NDCG parity is measured at: @10 when evaluated, else the smallest k."""
    return "ndcg@10" if 10 in ks else f"ndcg@{min(ks)}"


def write_skip(directory: Path, model_name: str) -> None:
    """The marker a baseline's export writes: only the fusion model has an ONNX bundle."""
    write_json(
        Path(directory) / SKIP_FILE,
        {
            "skipped": True,
            "model": model_name,
            "reason": f"model.name is {model_name!r}; only the metarec fusion model is exported to an "
            "ONNX bundle (baselines are not served or registered)",
        },
    )


@dataclass
class EncoderParts:
    """What the encoder export needs from the workspace: the torch encoder and the item texts."""

    encoder: Any  # components.text.encoder.Encoder, adapter merged, fp32
    texts: list[str]
    reference: np.ndarray  # the encode stage's embeddings of ``texts`` (what the model was trained on)
    finetuned: bool
    precision: str = "fp32"  # the reference's (text.precision when the encode stage ran)

    def fp32_reference(self, rows: np.ndarray) -> np.ndarray:
        """Torch fp32 embeddings of the texts at ``rows``: the reference itself unless it is bf16."""
        if self.precision == "fp32":
            return self.reference[rows]
        return np.asarray(self.encoder.encode([self.texts[int(k)] for k in rows]))


def load_encoder_parts(paths: Paths, cfg: Config) -> EncoderParts:
    """Rebuild the encode stage's encoder (with its adapter, in fp32) and its item texts and embeddings.

    The texts are verbalised exactly as the encode stage did; the embeddings are that stage's output.
    """
    from components.data import ingest, kg
    from components.text import features
    from components.text.encoder import Encoder, precision_fingerprint, resolve_model
    from components.text.verbalise import item_texts

    text = cfg.text
    meta = read_json(paths.text / "items" / "meta.json")
    adapter = paths.text / "finetune" / "adapter" if meta.get("finetuned") else None
    # fp32 whatever text.precision says: the ONNX graph is exported from fp32 weights, and the int8
    # encoder's parity is judged against them.
    encoder = Encoder(resolve_model(text.model), text.max_length, text.batch_size, text.threads, adapter)
    encoded_by = precision_fingerprint(encoder.fingerprint, meta.get("precision", "fp32"))
    if meta.get("fingerprint") and meta["fingerprint"] != encoded_by:
        raise ParityError(
            f"the encoder rebuilt from text.model={text.model!r}"
            f"{' and ' + str(adapter) if adapter else ''} has fingerprint {encoder.fingerprint[:12]}…, but "
            f"{paths.text} was encoded by {meta['fingerprint'][:12]}…; rerun the encode stage"
        )
    _, _, items, _ = ingest.read_processed(paths.processed)
    texts = item_texts(
        items,
        kg.load_graph(paths.graph),
        text.item_template,
        text.max_facts,
        max_titles=text.max_titles,
        max_shared=text.max_shared,
    )
    # The int8 encoder is judged against the vectors the model was trained on (the encode stage's, at
    # text.precision): re-encoding 20k items in fp32 here took minutes the check does not need.
    ids, reference, _ = features.load_embeddings(paths.text / "items")
    if ids != list(items.item_id.astype(str)):
        raise ParityError(f"{paths.text / 'items'} is not aligned with the processed items; rerun encode")
    return EncoderParts(encoder, texts, reference, adapter is not None, meta.get("precision", "fp32"))


def _copy_tables(paths: Paths, dest: Path, item_text: np.ndarray) -> None:
    from components.metapaths import report
    from components.text.verbalise import item_titles

    items = pd.read_parquet(paths.processed / "items.parquet")
    titles = item_titles(items)
    table = pd.DataFrame(
        {
            "item": items["item"].astype(np.int64),
            "item_id": items["item_id"].astype(str),
            "title": [titles[int(i)] for i in items["item"]],
        }
    )
    table.to_parquet(dest / "items.parquet", index=False)
    pd.read_parquet(paths.processed / "users.parquet").to_parquet(dest / "users.parquet", index=False)
    shutil.copyfile(paths.metapaths / report.METAPATHS_FILE, dest / "metapaths.json")
    shutil.copytree(paths.graph, dest / "graph")
    # Items never to recommend again: everything before the test period (train + valid), the same
    # exclusion as `metarec recommend`, so the server's lists equal the offline ones.
    from components.model.facade import load_parts

    seen = load_parts(paths).data.exclusions("test").tocoo()
    np.savez(
        dest / "seen.npz",
        seen_rows=seen.row.astype(np.int64),
        seen_cols=seen.col.astype(np.int64),
        seen_shape=np.asarray(seen.shape, dtype=np.int64),
    )
    np.savez(
        dest / ITEM_EMBEDDINGS,
        ids=np.asarray(table["item_id"].tolist(), dtype=str),
        vectors=np.asarray(item_text, dtype=np.float32),
    )


def model_card(
    cfg: Config,
    metrics: dict[str, Any],
    channels: list[str],
    n_items: int,
    n_users: int,
    encoder_name: str,
    finetuned: bool,
) -> str:
    """The bundle's model card (markdown)."""

    def table(section: dict[str, Any]) -> str:
        keys = [k for k in sorted(section) if k != "n_users"]
        head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
        return head + "| " + " | ".join(f"{float(section[k]):.4f}" for k in keys) + " |"

    m = cfg.model.metarec
    parity, latency, sizes = metrics["parity"], metrics["latency"], metrics["sizes"]
    cold = metrics.get("cold")
    lines = [
        "# metarec fusion recommender",
        "",
        "## Model",
        f"Metapath channels ({len(channels)}: {', '.join(channels)}) fused per user with a bilinear "
        f"text term over `{encoder_name}` embeddings (LoRA fine-tuned: "
        f"{'yes' if finetuned else 'no'}) and item-ID factors (rank {m.rank}); "
        f"switches: paths={m.use_paths}, text={m.use_text}, ids={m.use_ids}. "
        "Served as ONNX: the scorer in fp32, the text encoder in dynamic int8.",
        "",
        "## Data",
        f"Dataset `{cfg.data.name}` ({n_users} users, {n_items} items), split `{cfg.split.protocol}` "
        f"(train {cfg.split.train_ratio}, valid {cfg.split.valid_ratio}), seed {cfg.seed}; implicit "
        "feedback, full ranking excluding already-seen items.",
        "",
        "## Metrics",
        f"Warm test (torch model, {int(metrics['warm'].get('n_users', 0))} users):",
        "",
        table(metrics["warm"]),
        "",
    ]
    if cold:
        lines += [
            f"Cold items ({cfg.eval.cold_fraction:.0%} of items refitted without interactions, "
            f"{int(cold.get('n_users', 0))} users):",
            "",
            table(cold),
            "",
        ]
    lines += [
        "## Export parity",
        f"- scorer fp32 ONNX vs torch, max-abs difference: {parity['max_abs_diff_scorer']:.3g} "
        f"(tolerance {cfg.export.max_abs_diff:g})",
        f"- encoder fp32 ONNX vs torch, max-abs difference: {parity['max_abs_diff_encoder']:.3g}",
        f"- int8 vs the {parity.get('reference_precision', 'fp32')} embeddings the model was trained on, "
        f"mean cosine over {parity['cosine_texts']} item texts: "
        f"{parity['int8_mean_cosine']:.4f} (minimum {cfg.export.min_int8_cosine:g})",
        f"- test {parity['ndcg_metric']}: torch {parity['ndcg_torch']:.4f}, ONNX {parity['ndcg_onnx']:.4f}, "
        f"relative difference {parity['ndcg_rel_diff']:.2e} (maximum {cfg.export.max_ndcg_rel_diff:g})",
        f"- scorer latency (batch 1, {cfg.export.latency_threads} thread(s), "
        f"best of {cfg.export.latency_rounds} rounds of {cfg.export.latency_runs} runs): "
        f"p50 {latency['scorer_p50_ms']:.3f} ms, p99 {latency['scorer_p99_ms']:.3f} ms; int8 encoder "
        f"{latency['encoder_texts_per_s']:.0f} texts/s on {cfg.export.threads} thread(s)",
        f"- sizes: encoder {sizes['encoder_mb']:.1f} MiB (fp32 {sizes['encoder_fp32_mb']:.1f} MiB), "
        f"scorer {sizes['scorer_mb']:.1f} MiB, bundle {sizes['bundle_mb']:.1f} MiB",
        "",
        "## Intended use",
        "Top-k movie recommendations with metapath explanations for the catalogue it was trained on: known "
        "users from their history, cold users from a profile and/or a few items. A research/demo "
        "recommender on MovieLens-style implicit feedback.",
        "",
        "## Limitations",
        "- Trained on one public dataset with a temporal split; popularity and demographic biases of the "
        "data carry over, and the offline metrics do not measure fairness or user satisfaction.",
        "- New items need a text embedding and graph links computed offline: the item table, feature "
        "suffixes and graph are frozen in this bundle, so items added later are not ranked until retrained.",
        "- The int8 encoder approximates the fp32 one (mean cosine above); a cold user's profile text "
        "is embedded with it, their warm counterparts with the fp32 table in the bundle.",
        "- Explanations are path instances in the knowledge graph, not the model's causal reasons.",
    ]
    return "\n".join(lines) + "\n"


def export_bundle(paths: Paths, cfg: Config, dest: Path, work_dir: Path) -> dict[str, Any]:
    """Export, check and write the serving bundle into ``dest`` (an empty directory); return the manifest.

    Args:
        paths: The workspace.
        cfg: Its config (``export`` thresholds, ``text`` for the encoder).
        dest: The bundle directory being written (the export stage renames it into place afterwards).
        work_dir: Scratch space for intermediate ONNX files (not part of the bundle).

    Raises:
        ParityError: A parity check failed; nothing in ``dest`` is to be kept.
        FileNotFoundError: The model or ``metrics.json`` is missing.
    """
    from components.core import tracking
    from components.model.facade import load_parts
    from components.model.recommender import MetarecRecommender

    ex = cfg.export
    if not paths.metrics.is_file():
        raise FileNotFoundError(f"{paths.metrics} missing: the export compares against the evaluate stage's")
    torch_metrics = read_json(paths.metrics)
    if torch_metrics.get("model") != "metarec":
        raise ParityError(f"{paths.metrics} holds {torch_metrics.get('model')!r} metrics; rerun evaluate")
    model = MetarecRecommender.load(paths.model)
    net, bank = model.net.eval(), model.bank
    loaded = load_parts(paths)
    train = loaded.data.train
    rng = np.random.default_rng(cfg.seed)
    n_users = train.shape[0]

    # Scorer: export, then fp32 parity on a seeded sample of real users.
    scorer_path = export_scorer(net, dest / SCORER_ONNX, ex.opset)
    scorer = OnnxScorer(scorer_path, bank, model.profile, ex.threads)
    sample = np.sort(rng.choice(n_users, size=min(ex.parity_users, n_users), replace=False))
    rows = train[sample]
    max_abs_scorer = check_scorer_parity(
        net, scorer, rows.toarray(), model.profile[sample], bank.rows(rows, sample), ex.max_abs_diff
    )

    # NDCG parity: the evaluate stage's protocol with the ONNX scorer in place of torch.
    name = parity_metric(cfg.eval.ks)
    # Local threads only, even with eval.dask_address: an ONNX Runtime session cannot be pickled.
    onnx_eval = evaluate.evaluate(
        scorer,
        loaded.data,
        "test",
        cfg.eval.ks,
        cfg.eval.activity_buckets,
        cfg.eval.block_size,
        Blocks(cfg.eval.workers),
        cfg.eval.max_users,  # the users the evaluate stage's figure was ranked on
        cfg.seed,
    )
    ndcg_torch = float(torch_metrics["test"][name])
    ndcg_onnx = float(onnx_eval["overall"][name])
    ndcg_rel = check_relative(f"test {name}", ndcg_torch, ndcg_onnx, ex.max_ndcg_rel_diff)

    # Latency: batch 1, one user's real inputs, the scorer's run only.
    one = np.asarray([sample[0]])
    latency = scorer_latency(
        OnnxScorer(scorer_path, bank, model.profile, ex.latency_threads),
        train[one].toarray(),
        model.profile[one],
        bank.rows(train[one], one),
        ex.latency_runs,
        rounds=ex.latency_rounds,
    )

    # Encoder: export fp32 (scratch), int8 into the bundle; parity against the torch encoder.
    parts = load_encoder_parts(paths, cfg)
    tokenizer = parts.encoder.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    fp32_path = export_encoder(parts.encoder.model, work_dir / "encoder.fp32.onnx", pad_id, ex.opset)
    quantise_int8(fp32_path, dest / ENCODER_ONNX, work_dir)
    tokenizer.save_pretrained(str(dest / TOKENIZER_DIR))
    write_json(
        dest / ENCODER_JSON,
        {
            "max_length": cfg.text.max_length,
            "input_names": list(ENCODER_INPUTS),
            "output_name": "embedding",
            "dim": int(parts.reference.shape[1]),
            "pad_id": pad_id,
            "pooling": "mean over attention_mask, L2-normalised",
            "quantisation": "dynamic int8 (QInt8 weights, per channel)",
            "model": cfg.text.model,
            "fingerprint": parts.encoder.fingerprint,
            "finetuned": parts.finetuned,
        },
    )
    tokenizer_json = dest / TOKENIZER_DIR / "tokenizer.json"
    fp32_enc = OnnxEncoder(
        fp32_path, tokenizer_json, cfg.text.max_length, pad_id, cfg.text.batch_size, ex.threads
    )
    picked = np.sort(
        rng.choice(len(parts.texts), size=min(ex.encoder_sample, len(parts.texts)), replace=False)
    )
    max_abs_encoder = check_max_abs(
        "encoder embeddings",
        parts.fp32_reference(picked),
        fp32_enc.encode([parts.texts[int(k)] for k in picked]),
        ex.max_abs_diff,
    )
    int8_enc = OnnxEncoder.from_bundle(dest, cfg.text.batch_size, ex.threads)  # as the engine loads it
    judged = cosine_rows(len(parts.texts), ex.cosine_texts, cfg.seed)
    start = time.perf_counter()
    int8_vectors = int8_enc.encode([parts.texts[int(k)] for k in judged])
    texts_per_s = len(judged) / (time.perf_counter() - start)
    cosine = check_cosine(parts.reference[judged], int8_vectors, ex.min_int8_cosine)

    for filename in MODEL_FILES:
        shutil.copyfile(paths.model / filename, dest / filename)
    _copy_tables(paths, dest, net.item_text.numpy())

    metrics: dict[str, Any] = {
        "warm": torch_metrics["test"],
        "parity": {
            "max_abs_diff_scorer": max_abs_scorer,
            "max_abs_diff_encoder": max_abs_encoder,
            "int8_mean_cosine": cosine,
            "ndcg_rel_diff": ndcg_rel,
            "ndcg_metric": name,
            "ndcg_torch": ndcg_torch,
            "ndcg_onnx": ndcg_onnx,
            "cosine_texts": len(judged),
            "reference_precision": parts.precision,
        },
        "latency": {
            "scorer_p99_ms": latency["p99_ms"],
            "scorer_p50_ms": latency["p50_ms"],
            "scorer_mean_ms": latency["mean_ms"],
            "encoder_texts_per_s": texts_per_s,
        },
        "sizes": {
            "encoder_mb": file_mb(dest / ENCODER_ONNX),
            "encoder_fp32_mb": file_mb(fp32_path),
            "scorer_mb": file_mb(scorer_path),
            "bundle_mb": file_mb(dest),
        },
    }
    for section in ("cold", "cold_protocol"):
        if section in torch_metrics:
            metrics[section] = torch_metrics[section]
    card = model_card(
        cfg, metrics, bank.names, int(net.cfg.n_items), n_users, str(parts.encoder.ref.name), parts.finetuned
    )
    return write_manifest(
        dest,
        metrics=metrics,
        config=cfg.model_dump(mode="json"),
        data_version=tracking.data_version(paths.root),
        git_commit=tracking.git_commit(),
        model_card=card,
    )


def make_work_dir(paths: Paths) -> tempfile.TemporaryDirectory[str]:
    """Scratch directory next to the bundle (same file system, removed afterwards)."""
    parent = paths.root / "models"
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".export-work-", dir=parent)
