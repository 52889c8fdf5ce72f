"""Text-feature benchmarks on ml-100k with the packaged all-MiniLM-L6-v2 (CPU, offline).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text_encoder.py                 # encode + 10 LoRA steps
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text_encoder.py --quality-steps 200
        # ...then also fine-tune for 200 steps and compare frozen vs fine-tuned on validation pairs

Prints: items/s encoding every ml-100k item text (threads=2, max_length 128, batch 64), the time to
re-encode them through the embedding cache (all hits), and seconds per LoRA fine-tuning step
(batch 32, r=8) averaged over 10 steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.core.config import Config, FinetuneSection, SplitConfig  # noqa: E402
from components.data import fetch, ingest, kg, split  # noqa: E402
from components.text.encoder import EmbeddingCache, Encoder, encode_cached, resolve_model  # noqa: E402
from components.text.finetune import FinetuneConfig, finetune, validation_signal  # noqa: E402
from components.text.pairs import holdout_pairs, next_item_pairs  # noqa: E402
from components.text.verbalise import item_texts  # noqa: E402

THREADS = 2


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finetune_config(steps: int, warmup_steps: int) -> FinetuneConfig:
    """``text.finetune``'s defaults at the measured batch of 32 pairs, without checkpoints."""
    section = FinetuneSection(batch_size=32, steps=steps, warmup_steps=warmup_steps, checkpoint_every=0)
    return FinetuneConfig.from_section(section, Config().seed)


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="timed fine-tuning steps (after one warm-up)")
    parser.add_argument("--quality-steps", type=int, default=0, help="also fine-tune this long and validate")
    parser.add_argument("--valid-users", type=int, default=300, help="validation users for --quality-steps")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        fetch.fetch(raw, None, "ml-100k")
        data = ingest.load_dataset(raw, "ml-100k")
        graph, _ = kg.build_graph(
            data.users, data.items, data.kg, cfg.kg.item_fields, cfg.kg.user_fields, cfg.kg.age_buckets
        )
        parts = split.split_interactions(data.interactions, SplitConfig())

        start = time.perf_counter()
        texts = item_texts(data.items, graph)
        verbalise_s = time.perf_counter() - start
        ref = resolve_model("default")
        start = time.perf_counter()
        encoder = Encoder(ref, max_length=128, batch_size=64, threads=THREADS)
        load_s = time.perf_counter() - start
        tokens = [len(ids) for ids in encoder.tokenizer(texts, truncation=False)["input_ids"]]
        cache = EmbeddingCache(Path(tmp) / "cache")
        start, cpu = time.perf_counter(), time.process_time()
        _, hits_cold = encode_cached(encoder, texts, cache)
        cold_s, cold_cpu = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        _, hits_warm = encode_cached(encoder, texts, EmbeddingCache(Path(tmp) / "cache"))
        warm_s = time.perf_counter() - start
        print(f"ml-100k text features, all-MiniLM-L6-v2 (packaged), CPU threads={THREADS}")
        print(
            f"  {len(texts)} item texts verbalised in {verbalise_s:.2f}s; tokens per text: mean "
            f"{np.mean(tokens):.0f}, p90 {np.percentile(tokens, 90):.0f}, max {max(tokens)} "
            f"({np.mean(np.asarray(tokens) > 128):.0%} truncated at 128)"
        )
        print(f"  model load + checksum: {load_s:.2f}s")
        rate = len(texts) / cold_s
        print(
            f"  encode all items (cold cache, {hits_cold} hits): {cold_s:.2f}s = {rate:.0f} items/s "
            f"(process CPU {cold_cpu:.1f}s = {cold_cpu / cold_s:.2f} cores busy; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )
        print(f"  re-encode through the cache ({hits_warm} hits, fresh cache object): {warm_s * 1000:.0f} ms")
        print(f"  peak RSS after encoding: {peak_rss_mb():.0f} MiB")

        pairs = next_item_pairs(parts.train, data.users, data.items, texts, n_recent=10, max_per_user=20)
        stamps: list[float] = []

        def log(name: str, value: float, step: int) -> None:
            if name == "finetune/loss":
                stamps.append(time.perf_counter())

        steps = args.steps + 1
        ft = finetune_config(steps=steps, warmup_steps=1)
        cpu = time.process_time()
        result = finetune(ref, pairs, ft, Path(tmp) / "ft", log, threads=THREADS)
        ft_cpu = time.process_time() - cpu
        per_step = np.diff(stamps)
        print(
            f"  LoRA fine-tuning (r=8, batch 32 pairs = 64 texts, max_length 128, {len(pairs)} train pairs): "
            f"{per_step.mean():.2f}s/step (mean of {len(per_step)} steps after a warm-up, "
            f"min {per_step.min():.2f}, max {per_step.max():.2f}); trainable {result.trainable_params:,} "
            f"of {result.total_params:,} weights ({result.trainable_params / result.total_params:.2%}); "
            f"process CPU {ft_cpu:.0f}s over {result.wall_s:.0f}s wall"
        )

        if args.quality_steps:
            valid = holdout_pairs(parts.train, parts.valid, data.users, data.items, texts, n_recent=10)
            rng = np.random.default_rng(0)
            chosen = np.sort(rng.choice(len(valid), size=min(args.valid_users, len(valid)), replace=False))
            valid = valid.subset(chosen)
            frozen = validation_signal(encoder, valid)
            long = finetune_config(steps=args.quality_steps, warmup_steps=args.quality_steps // 10)
            start = time.perf_counter()
            tuned_result = finetune(ref, pairs, long, Path(tmp) / "ft-long", threads=THREADS)
            tuned = Encoder(ref, threads=THREADS, adapter_dir=tuned_result.adapter_dir)
            signal = validation_signal(tuned, valid)
            first, last = np.mean(tuned_result.losses[:10]), np.mean(tuned_result.losses[-10:])
            print(
                f"  validation ({len(valid)} users, next held-out item among {len(texts)} items): frozen MRR "
                f"{frozen['mrr']:.4f} recall@10 {frozen['recall@10']:.4f} | after {args.quality_steps} steps "
                f"({time.perf_counter() - start:.0f}s) MRR {signal['mrr']:.4f} "
                f"recall@10 {signal['recall@10']:.4f}; loss (mean of 10 steps) {first:.3f} -> {last:.3f}"
            )
    print(f"  peak RSS after fine-tuning: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
