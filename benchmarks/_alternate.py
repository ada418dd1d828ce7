"""Contenders trained in alternation, block by block, in one process (benchmarks/speed.py, ab.py).

A shared machine's load drifts (other jobs start and stop); timing each contender in its own
stretch of minutes would measure the drift. Here every round runs a block of each contender in
turn, so a change of load hits all of them alike and their ratios hold.

A contender either draws its own batches (the fetch is timed: a system's DataLoader is part of
its cost) or ``follows`` another one: it trains on the batches that one took in the same round,
converted by ``convert`` before its clock starts (a baseline on the very same sequences).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class Contender:
    """name: its row; batches: its own batch source (None when it follows another); step: one
    training step on a batch; count: what a batch is worth ({'samples': ..., 'tokens': ...});
    follows / convert: train on another contender's batches of the round, converted; enter: called
    before each of its blocks (e.g. set the thread count), its time not counted."""

    name: str
    step: Callable[[Any], None]
    count: Callable[[Any], dict[str, float]]
    batches: Iterator[Any] | None = None
    follows: str | None = None
    convert: Callable[[Any], Any] = field(default=lambda batch: batch)
    enter: Callable[[], None] | None = None


def block_sizes(steps: int, rounds: int) -> list[int]:
    """``steps`` split into ``rounds`` blocks as evenly as possible (the first ones one larger)."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def alternate(contenders: list[Contender], *, steps: int, warmup: int, rounds: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Per contender: the totals of ``count`` over its timed batches and ``seconds``, the time of
    its timed blocks. ``warmup`` untimed steps of each first; then ``steps`` timed steps in
    ``rounds`` blocks; ``sync`` ends a timed block (CUDA's queue)."""
    by_name = {c.name: c for c in contenders}
    for c in contenders:
        if (c.batches is None) == (c.follows is None):
            raise ValueError(f"contender {c.name}: give batches or follows, not {'both' if c.batches else 'neither'}")
        if c.follows is not None and (c.follows not in by_name or
                                      contenders.index(by_name[c.follows]) > contenders.index(c)):
            raise ValueError(f"contender {c.name} follows {c.follows!r}, which must come before it")
    out: dict[str, dict[str, float]] = {c.name: {"seconds": 0.0} for c in contenders}

    def run_block(size: int, timed: bool, taken: dict[str, list[Any]]) -> None:
        for c in contenders:
            if c.enter is not None:
                c.enter()
            if c.batches is not None:
                work = None
            else:
                work = [c.convert(b) for b in taken[c.follows]]  # before the clock starts
            mine: list[Any] = []
            sync()
            started = time.perf_counter()
            if work is None:
                for _ in range(size):
                    batch = next(c.batches)
                    c.step(batch)
                    mine.append(batch)
            else:
                for item in work:
                    c.step(item)
                mine = work
            sync()
            seconds = time.perf_counter() - started
            taken[c.name] = mine
            if timed:
                out[c.name]["seconds"] += seconds
                for item in mine:
                    for k, v in c.count(item).items():
                        out[c.name][k] = out[c.name].get(k, 0.0) + v

    if warmup:
        run_block(warmup, False, {})
    for size in block_sizes(steps, rounds):
        run_block(size, True, {})
    return out


__all__ = ["Contender", "alternate", "block_sizes"]
