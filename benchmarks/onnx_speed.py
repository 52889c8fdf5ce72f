"""Torch fp32 vs ONNX fp32 vs ONNX int8: encoder throughput, scorer latency, accuracy cost, sizes.

Usage: .venv/bin/python benchmarks/onnx_speed.py --workspace WS [--texts 512] [--threads 2] [--runs 300]
WS is a trained metarec workspace (``metarec run -S model.name=metarec``); only its embedding cache may
be written (on a miss).
Encoder: the workspace's MiniLM with its LoRA adapter merged, on a seeded sample of item texts, batch
``text.batch_size``, ``--threads`` threads for torch and ONNX Runtime alike, the variants taking turns.
Scorer: batch 1 (one real user's inputs), one thread, ``session.run`` / ``forward`` only, best of 3
rounds; the int8 scorer is measured to show why the bundle keeps the scorer in fp32 (its test NDCG@10
is computed too).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.bundle import export
from components.bundle.runtime import OnnxEncoder, OnnxScorer
from components.core.config import load_config
from components.core.workspace import Paths
from components.evaluation import protocol as evaluate
from components.model.facade import load_parts
from components.model.recommender import WEIGHTS, MetarecRecommender


def best_rates(fns: dict[str, Any], n: int, repeats: int) -> dict[str, float]:
    """Items per second of each ``fn()`` over ``n`` items, best of ``repeats`` timed calls.

    The variants take turns in every round, so load from other processes hits them alike.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / seconds for name, seconds in best.items()}


def torch_latency(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], runs: int, rounds: int = 3
) -> dict[str, float]:
    """p50/p99 milliseconds of a torch forward pass, from the round with the lowest p99 (as the stage)."""
    results = []
    with torch.inference_mode():
        for _ in range(20):
            module(*inputs)
        for _ in range(rounds):
            times = np.empty(runs)
            for r in range(runs):
                start = time.perf_counter()
                module(*inputs)
                times[r] = time.perf_counter() - start
            ms = times * 1000
            results.append({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
    return min(results, key=lambda result: result["p99_ms"])


def main() -> None:
    """Measure everything in one run and print a markdown table plus ratios (JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    paths = Paths(args.workspace.resolve())
    cfg = load_config(paths.params)
    parts = export.load_encoder_parts(paths, cfg)
    encoder = parts.encoder
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(cfg.seed)
    picked = rng.choice(len(parts.texts), size=min(args.texts, len(parts.texts)), replace=False)
    texts = [parts.texts[int(k)] for k in picked]
    pad_id = int(encoder.tokenizer.pad_token_id)
    out: dict[str, Any] = {"texts": len(texts), "threads": args.threads, "batch_size": encoder.batch_size}
    out["load_average_before"] = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        fp32_path = export.export_encoder(encoder.model, tmp / "encoder.fp32.onnx", pad_id)
        out["encoder_export_s"] = time.perf_counter() - start
        start = time.perf_counter()
        int8_path = export.quantise_int8(fp32_path, tmp / "encoder.int8.onnx", tmp / "work")
        out["encoder_quantise_s"] = time.perf_counter() - start
        encoder.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        tok = tmp / "tokenizer" / "tokenizer.json"
        length, batch = cfg.text.max_length, encoder.batch_size
        fp32 = OnnxEncoder(fp32_path, tok, length, pad_id, batch, args.threads)
        int8 = OnnxEncoder(int8_path, tok, length, pad_id, batch, args.threads)
        encoders = {"torch_fp32": encoder, "onnx_fp32": fp32, "onnx_int8": int8}
        for enc in encoders.values():
            enc.encode(texts[:batch])  # warm-up: first-run allocations and graph optimisation
        rates = best_rates(
            {k: (lambda e=e: e.encode(texts)) for k, e in encoders.items()}, len(texts), args.repeats
        )
        out.update({f"encoder_{k}_texts_per_s": v for k, v in rates.items()})
        reference = encoder.encode(texts)
        out["encoder_fp32_max_abs"] = float(np.max(np.abs(fp32.encode(texts) - reference)))
        int8_vectors = int8.encode(texts)
        cosines = np.sum(reference * int8_vectors, axis=1) / np.linalg.norm(int8_vectors, axis=1)
        out["encoder_int8_mean_cosine"] = float(cosines.mean())
        out["encoder_int8_min_cosine"] = float(cosines.min())
        base_weights = sorted(encoder.ref.path.glob("*.safetensors"))
        out["encoder_torch_fp32_mb"] = sum(p.stat().st_size for p in base_weights) / 2**20
        out["encoder_onnx_fp32_mb"] = export.file_mb(fp32_path)
        out["encoder_onnx_int8_mb"] = export.file_mb(int8_path)

        # Scorer, batch 1 on one thread.
        torch.set_num_threads(1)
        model = MetarecRecommender.load(paths.model)
        loaded = load_parts(paths)
        train = loaded.data.train
        scorer_fp32 = export.export_scorer(model.net, tmp / "scorer.fp32.onnx")
        scorer_int8 = export.quantise_int8(scorer_fp32, tmp / "scorer.int8.onnx", tmp / "work")
        user = np.asarray([int(rng.integers(train.shape[0]))])
        feeds = (train[user].toarray(), model.profile[user], model.bank.rows(train[user], user))
        wrapper = export.ScorerWithGates(model.net).eval()
        lat = torch_latency(
            wrapper, tuple(torch.from_numpy(np.asarray(a, np.float32)) for a in feeds), args.runs
        )
        out["scorer_torch_fp32_p50_ms"], out["scorer_torch_fp32_p99_ms"] = lat["p50_ms"], lat["p99_ms"]
        with torch.inference_mode():
            want = wrapper(*(torch.from_numpy(np.asarray(a, np.float32)) for a in feeds))[0].numpy()
        ndcg_name = export.parity_metric(cfg.eval.ks)
        for name, path in (("onnx_fp32", scorer_fp32), ("onnx_int8", scorer_int8)):
            one_thread = OnnxScorer(path, model.bank, model.profile, 1)
            lat = export.scorer_latency(one_thread, *feeds, runs=args.runs, rounds=3)
            out[f"scorer_{name}_p50_ms"], out[f"scorer_{name}_p99_ms"] = lat["p50_ms"], lat["p99_ms"]
            got, _ = one_thread(*feeds)
            out[f"scorer_{name}_max_abs"] = float(np.max(np.abs(got - want)))
            scorer = OnnxScorer(path, model.bank, model.profile, args.threads)
            result = evaluate.evaluate(scorer, loaded.data, "test", cfg.eval.ks, cfg.eval.activity_buckets)  # type: ignore[arg-type]
            out[f"scorer_{name}_test_{ndcg_name}"] = float(result["overall"][ndcg_name])
        out["scorer_torch_fp32_mb"] = export.file_mb(paths.model / WEIGHTS)
        out["scorer_onnx_fp32_mb"] = export.file_mb(scorer_fp32)
        out["scorer_onnx_int8_mb"] = export.file_mb(scorer_int8)

    out["load_average_after"] = os.getloadavg()[0]
    enc = {k: out[f"encoder_{k}_texts_per_s"] for k in ("torch_fp32", "onnx_fp32", "onnx_int8")}
    sco = {k: out[f"scorer_{k}_p99_ms"] for k in ("torch_fp32", "onnx_fp32", "onnx_int8")}
    out["ratio_encoder_onnx_fp32_vs_torch"] = enc["onnx_fp32"] / enc["torch_fp32"]
    out["ratio_encoder_onnx_int8_vs_torch"] = enc["onnx_int8"] / enc["torch_fp32"]
    out["ratio_scorer_p99_torch_vs_onnx_fp32"] = sco["torch_fp32"] / sco["onnx_fp32"]
    out["ratio_scorer_p99_torch_vs_onnx_int8"] = sco["torch_fp32"] / sco["onnx_int8"]

    print(
        f"encoder: {len(texts)} item texts, batch {encoder.batch_size}, {args.threads} threads; load average "
        f"{out['load_average_before']:.2f} before, {out['load_average_after']:.2f} after"
    )
    print(
        "| variant | encoder texts/s | × torch | encoder MiB | scorer p50 ms | scorer p99 ms | scorer MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, label in (("torch_fp32", "torch fp32"), ("onnx_fp32", "ONNX fp32"), ("onnx_int8", "ONNX int8")):
        print(
            f"| {label} | {enc[key]:.0f} | {enc[key] / enc['torch_fp32']:.2f} | "
            f"{out[f'encoder_{key}_mb']:.1f} | {out[f'scorer_{key}_p50_ms']:.3f} | {sco[key]:.3f} | "
            f"{out[f'scorer_{key}_mb']:.1f} |"
        )
    print(
        f"encoder fp32 max-abs {out['encoder_fp32_max_abs']:.2e}; int8 cosine mean "
        f"{out['encoder_int8_mean_cosine']:.4f} min {out['encoder_int8_min_cosine']:.4f}"
    )
    print(
        f"scorer max-abs vs torch: fp32 {out['scorer_onnx_fp32_max_abs']:.2e}, int8 "
        f"{out['scorer_onnx_int8_max_abs']:.2e}; test {ndcg_name}: fp32 "
        f"{out[f'scorer_onnx_fp32_test_{ndcg_name}']:.4f}, "
        f"int8 {out[f'scorer_onnx_int8_test_{ndcg_name}']:.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
