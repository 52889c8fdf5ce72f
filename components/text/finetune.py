"""Parameter-efficient fine-tuning of the text encoder for next-item recommendation.

LoRA adapters on the attention query/value projections are trained with an InfoNCE objective that
pulls a user's history text towards the text of the item the user consumed next, against the other
items of the batch. Only the adapters train (well under 1% of MiniLM's weights), so a run fits a
2-core CPU and the saved artefact is a few hundred KB.

Runs are reproducible: LoRA initialisation and dropout draw from a forked, seeded torch RNG, batch
order from a seeded numpy Generator, and a checkpoint (adapter, optimizer, scheduler, both RNG
states, step) resumes to the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.core.config import FinetuneSection
from components.core.storage import atomic_dir, read_json, write_json
from components.text.encoder import (
    FINETUNE_JSON,
    EmbeddingCache,
    Encoder,
    ModelError,
    ModelRef,
    adapter_fingerprint,
    combine_fingerprints,
    embed,
    encode_cached,
    load_base_model,
    load_tokenizer,
    quiet_peft,
    tokenize,
)
from components.text.pairs import PairSet

LogFn = Callable[[str, float, int], None]
STATE_PT = "state.pt"
STATE_JSON = "state.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TARGET_MODULES = ("query", "value")


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run is: the ``text.finetune`` section's hyperparameters plus the seed.

    No defaults and no checks here: ``FinetuneSection`` holds both (with the reasons), and
    :meth:`from_section` is how a config is made, so neither can drift from ``params.yaml``.
    """

    r: int
    alpha: int
    dropout: float
    lr: float
    steps: int
    batch_size: int
    temperature: float
    warmup_steps: int
    seed: int
    max_length: int
    checkpoint_every: int

    @classmethod
    def from_section(cls, section: FinetuneSection, seed: int) -> FinetuneConfig:
        """The run's config from a validated ``text.finetune`` section."""
        names = {f.name for f in dataclasses.fields(cls)} - {"seed"}
        return cls(seed=seed, **section.model_dump(include=names))

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes:
        adapter_dir: The saved adapter (``adapter_config.json``, weights, ``finetune.json``).
        config: The run's configuration.
        losses: Training loss of every step from step 0 (earlier steps come from the checkpoint).
        learning_rates: Learning rate used at every step.
        trainable_params: Adapter weights trained.
        total_params: All weights of the adapted model.
        wall_s: Seconds this call spent (a resumed run counts only its own part).
        resumed_from_step: Step the run resumed at (0 for a fresh run).
        fingerprint: Base model + saved adapter fingerprint, equal to that of
            ``Encoder(ref, adapter_dir=adapter_dir)``, so both share embedding-cache entries.
        model: The trained model in memory (eval mode, adapter not merged).
        tokenizer: Its tokenizer.
    """

    adapter_dir: Path
    config: FinetuneConfig
    losses: list[float]
    learning_rates: list[float]
    trainable_params: int
    total_params: int
    wall_s: float
    resumed_from_step: int = 0
    fingerprint: str = ""
    model: Any = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def encoder(self, batch_size: int = 64) -> Encoder:
        """The in-memory model as an :class:`Encoder` (no reload, adapter not merged)."""
        return Encoder.from_modules(
            self.model, self.tokenizer, self.fingerprint, self.config.max_length, batch_size
        )


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then linear decay to 0 at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    remaining = cfg.steps - step
    return max(0.0, remaining / max(1, cfg.steps - cfg.warmup_steps))


def info_nce(
    queries: torch.Tensor, positives: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE with in-batch negatives over unit vectors.

    A query's other-row positives are its negatives, except rows whose target is the same item:
    those are masked out, since scoring the true item as a negative would punish being right.
    """
    logits = queries @ positives.T / temperature
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(queries))
    return F.cross_entropy(logits, labels)


def _next_batch(
    rng: np.random.Generator, order: np.ndarray, position: int, n: int, size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    # Epochs of seeded permutations: every pair is seen once per epoch; a batch may span two epochs.
    taken: list[np.ndarray] = []
    need = size
    while need:
        if position >= len(order):
            order, position = rng.permutation(n), 0
        chunk = order[position : position + need]
        taken.append(chunk)
        position += len(chunk)
        need -= len(chunk)
    return np.concatenate(taken), order, position


def _peft_model(ref: ModelRef, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    base = load_base_model(ref)
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(TARGET_MODULES)
    )
    try:
        with quiet_peft():
            return get_peft_model(base, lora)
    except ValueError as exc:
        raise ModelError(
            f"cannot place LoRA on modules {list(TARGET_MODULES)} of {ref.name} (a BERT-style encoder is "
            f"expected): {exc}"
        ) from None


def _count(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return int(trainable), int(total)


def _save_checkpoint(
    dest: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    order: np.ndarray,
    position: int,
    step: int,
    losses: Sequence[float],
    lrs: Sequence[float],
    meta: dict[str, Any],
) -> None:
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "order": torch.as_tensor(order, dtype=torch.long),
            },
            tmp / STATE_PT,
        )
        # numpy's PCG64 state holds 128-bit ints: JSON keeps them exact where torch's safe loader won't.
        write_json(
            tmp / STATE_JSON,
            {
                **meta,
                "step": step,
                "position": position,
                "numpy_rng": rng.bit_generator.state,
                "losses": list(losses),
                "learning_rates": list(lrs),
            },
        )


def _load_checkpoint(
    src: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> tuple[np.ndarray, int, int, list[float], list[float]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(src)
    if not (src / STATE_JSON).is_file() or not (src / STATE_PT).is_file():
        raise ValueError(f"{src} is not a fine-tuning checkpoint (needs {STATE_JSON} and {STATE_PT})")
    state = read_json(src / STATE_JSON)
    for key, expected in meta.items():
        if state.get(key) != expected:
            raise ValueError(
                f"checkpoint {src} was written with a different {key} ({json.dumps(state.get(key))[:80]} vs "
                f"{json.dumps(expected)[:80]}); resume only with the same model, pairs and config"
            )
    weights = load_file(str(src / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"checkpoint {src}: adapter weights do not fit the model ({unexpected[:3]})")
    tensors = torch.load(src / STATE_PT, weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    order = tensors["order"].numpy().astype(np.int64)
    return order, int(state["position"]), int(state["step"]), state["losses"], state["learning_rates"]


def finetune(
    ref: ModelRef,
    pairs: PairSet,
    cfg: FinetuneConfig,
    out_dir: Path,
    log: LogFn | None = None,
    resume_from: Path | None = None,
    *,
    threads: int | None = None,
) -> FinetuneResult:
    """Fine-tune LoRA adapters on (history, next item) pairs with in-batch-negative InfoNCE.

    Args:
        ref: Base model.
        pairs: Training pairs (see :mod:`components.text.pairs`).
        cfg: Hyperparameters.
        out_dir: Receives ``adapter/`` (adapter weights + ``finetune.json``, written atomically at the
            end) and ``checkpoints/step-NNNNNN/`` every ``cfg.checkpoint_every`` steps.
        log: Called as ``log(name, value, step)`` with ``finetune/loss`` and ``finetune/lr`` each step
            (``step`` counts from 0; wire it to ``mlflow.log_metric``).
        resume_from: A checkpoint folder of an earlier run with the same model, pairs and config.
        threads: Torch intra-op threads (process-wide); None leaves the current setting.

    Returns:
        The result, including the in-memory model for immediate use.

    Raises:
        ValueError: Fewer than two pairs, or a checkpoint from a different run.
        ModelError: The model cannot be loaded or adapted.
    """
    if len(pairs) < 2:
        raise ValueError(f"fine-tuning needs at least 2 pairs for in-batch negatives, got {len(pairs)}")
    out_dir = Path(out_dir)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    started = time.perf_counter()
    batch_size = min(cfg.batch_size, len(pairs))
    # What a checkpoint must agree on to resume exactly; how often checkpoints are taken does not matter.
    training = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}
    meta = {
        "config": training,
        "base_fingerprint": ref.fingerprint,
        "pairs_fingerprint": pairs.fingerprint(),
    }
    tokenizer = load_tokenizer(ref)
    # Forked so seeding for LoRA init and dropout leaves the caller's global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _peft_model(ref, cfg)
        trainable, total = _count(model)
        params = [p for p in model.parameters() if p.requires_grad]
        # No weight decay: it would pull the adapters towards zero, i.e. back to the frozen model.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        rng = np.random.default_rng(cfg.seed)
        order, position, start = np.empty(0, dtype=np.int64), 0, 0
        losses: list[float] = []
        lrs: list[float] = []
        if resume_from is not None:
            order, position, start, losses, lrs = _load_checkpoint(
                Path(resume_from), model, optimizer, scheduler, rng, meta
            )
        model.train()
        targets_all = torch.as_tensor(pairs.targets, dtype=torch.long)
        for step in range(start, cfg.steps):
            index, order, position = _next_batch(rng, order, position, len(pairs), batch_size)
            queries = embed(
                model, tokenize(tokenizer, [pairs.queries[int(k)] for k in index], cfg.max_length)
            )
            positives = embed(model, tokenize(tokenizer, pairs.positives(index), cfg.max_length))
            loss = info_nce(queries, positives, targets_all[index], cfg.temperature)
            lr = float(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            lrs.append(lr)
            if log is not None:
                log("finetune/loss", losses[-1], step)
                log("finetune/lr", lr, step)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(
                    out_dir / CHECKPOINTS / f"step-{step + 1:06d}",
                    model,
                    optimizer,
                    scheduler,
                    rng,
                    order,
                    position,
                    step + 1,
                    losses,
                    lrs,
                    meta,
                )
        model.eval()
    wall = time.perf_counter() - started
    adapter_dir = out_dir / ADAPTER
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_json(
            tmp / FINETUNE_JSON,
            {
                **meta,
                "config": cfg.to_dict(),
                "base_model": ref.name,
                "target_modules": list(TARGET_MODULES),
                "objective": "infonce_next_item_in_batch_negatives",
                "n_pairs": len(pairs),
                "trainable_params": trainable,
                "total_params": total,
                "final_loss": losses[-1] if losses else None,
                "resumed_from_step": start,
                "wall_s": wall,
            },
        )
    fingerprint = combine_fingerprints(ref.fingerprint, adapter_fingerprint(adapter_dir))
    return FinetuneResult(
        adapter_dir, cfg, losses, lrs, trainable, total, wall, start, fingerprint, model, tokenizer
    )


def validation_signal(
    encoder: Encoder, pairs: PairSet, k: int = 10, cache: EmbeddingCache | None = None
) -> dict[str, float]:
    """Rank every pair's true next item among all candidates by cosine to the query.

    Items already in the query's history are excluded, as a recommender would. Compare a frozen and a
    fine-tuned encoder on the same held-out pairs; a cache saves re-encoding the candidate items.

    Returns:
        ``mrr``, ``recall@k`` (hit rate of the single target), ``mean_rank`` and ``n_pairs``.
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to validate on")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    unique = sorted(set(pairs.queries))
    position = {text: i for i, text in enumerate(unique)}

    def encode(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts) if cache is None else encode_cached(encoder, texts, cache)[0]

    queries = encode(unique)[[position[q] for q in pairs.queries]]
    candidates = encode(pairs.candidates)
    scores = queries @ candidates.T
    rows = np.arange(len(pairs))
    true = scores[rows, pairs.targets].copy()
    for row, seen in enumerate(pairs.seen):
        scores[row, seen] = -np.inf
    # Rank = candidates scoring at least the target's score, the target included; ties count against
    # the target, so a constant encoder cannot look perfect.
    ranks = (scores >= true[:, None]).sum(axis=1)
    return {
        "mrr": float(np.mean(1.0 / ranks)),
        f"recall@{k}": float(np.mean(ranks <= k)),
        "mean_rank": float(np.mean(ranks)),
        "n_pairs": float(len(pairs)),
    }
