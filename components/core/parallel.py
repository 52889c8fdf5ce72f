"""Independent blocks of work run in order, on local Dask threads, or on a Dask cluster.

The one home of block parallelism outside mining (which has Prefect task runners): evaluation and
training validation rank users in blocks, and every block is independent of the others. Results come
back in block order, so a caller's output does not depend on where the blocks ran (tested: rankings
are equal on every path).

Why threads locally: a block's work is sparse products, numpy and torch, which release the GIL for most
of their time, and threads share the model instead of copying it into each process. A cluster gets the
shared object once per worker (``scatter(broadcast=True)``), not once per block.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Blocks:
    """Where blocks run: ``workers`` local threads (1: in order, no Dask), or the cluster at ``address``."""

    workers: int = 1
    address: str = ""  # tcp://scheduler:8786: a running Dask cluster; wins over ``workers``
    timeout_s: float = 30.0  # how long to wait for the cluster's scheduler to answer

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    @property
    def label(self) -> str:
        """How blocks run, for logs and run tags."""
        if self.address:
            return f"dask cluster {self.address}"
        return "serial" if self.workers == 1 else f"dask threads x{self.workers}"

    def map(self, fn: Callable[[Any, T], R], shared: Any, items: Sequence[T]) -> list[R]:
        """``[fn(shared, item) for item in items]``, wherever configured, in input order.

        ``shared`` is what every call reads (a model, a history matrix): passed as is to local threads,
        sent once to each worker of a cluster.
        """
        if self.address:
            return _on_cluster(self.address, self.timeout_s, fn, shared, items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(shared, item) for item in items]
        import dask

        tasks = [dask.delayed(fn, pure=False)(shared, item) for item in items]
        with _torch_threads(1):
            return list(dask.compute(*tasks, scheduler="threads", num_workers=self.workers))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` meanwhile, when torch is loaded at all.

    Our worker threads already fill the cores: on the 2-core machine 2 workers each running torch on 2
    threads ranked no faster than one block at a time (1.5 s per 4k users of the small graph), 2 workers
    on 1 torch thread each twice as fast (0.8 s).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _on_cluster(
    address: str, timeout_s: float, fn: Callable[[Any, T], R], shared: Any, items: Sequence[T]
) -> list[R]:
    from distributed import Client

    try:
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except OSError as err:  # refused, unreachable or timed out
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {err}") from None
    with client:
        remote = client.scatter(shared, broadcast=True, hash=False)
        futures = client.map(fn, [remote] * len(items), list(items), pure=False)
        return list(client.gather(futures))
