"""k nearest neighbours per layer, as DINO evaluates features: cosine similarity to the training
rows, the k=20 most similar vote for their class with weight exp(similarity / 0.07).

Nothing is trained and there is no C. The training rows are held in chunks that fit the memory
budget; the test rows stream past each chunk block by block, and each test row keeps its running
k best (similarity, class) pairs, so no similarity matrix is ever held whole. Where the training
rows fit one chunk, the test rows go a part at a time, so that the running k best and the class
votes of a million test rows stay within the budget too."""

from __future__ import annotations

import time

import numpy as np
import torch

from featx.data.splits import Split
from featx.probes import Probe, ProbeOptions, ProbeParam, ProbeResult, balanced_accuracy, register
from featx.probes.stream import LayerStream
from featx.probes.threads import running_on, thread_cap, threads_for

NEIGHBOURS = 20
TEMPERATURE = 0.07


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _held_chunk(stream: LayerStream, split: Split, chunk: int, budget: int, start: int = 0) -> torch.Tensor:
    """The training rows from `start` (at most `chunk` of them), scaled to unit length in place."""
    held = stream.gather(split.train[start:start + chunk], budget // 2, "a chunk of training rows")
    held /= held.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return held


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions) -> tuple[ProbeResult, None]:
    """Score the test rows by their nearest training rows, on the threads a block's similarities
    are worth (featx.probes.threads); no model is saved (it would be the training rows themselves)."""
    started = time.perf_counter()
    similarities = stream.block_flops(min(len(split.train), max(1, options.memory // 2 // stream.row_bytes)))
    with running_on(threads_for(similarities, thread_cap(options.threads))):
        return _train_layer(stream, split, options, started=started)


def _train_layer(stream: LayerStream, split: Split, options: ProbeOptions, *, started: float,
                 ) -> tuple[ProbeResult, None]:
    stream.memo.clear()  # what a linear probe kept for the next one: k-NN needs the room
    budget = stream.budget_left(options.memory)
    stream.fit_scaling(split.train, budget)
    k = min(int(options.params.get("k", NEIGHBOURS)), len(split.train))
    temperature = float(options.params.get("temperature", TEMPERATURE))
    tests = stream.ranks.share(split.test)  # each rank scores its part of the test rows
    device, n_classes = stream.device, len(stream.store.classes)
    chunk = stream.rows_within(budget // 2, "a chunk of training rows")
    block_rows = max(1, min(stream.block_rows(budget // 2),
                            (budget // 4) // max(1, 4 * min(chunk, len(split.train)))))
    train_labels = torch.as_tensor(stream.labels[split.train], device=device)
    starts = range(0, len(split.train), chunk)
    held = _held_chunk(stream, split, chunk, budget) if len(starts) == 1 else None  # read once
    # Each test row keeps its running k best across the training chunks. With one chunk the test
    # rows go a part at a time, each part's k best within an eighth of the budget; with several,
    # every test row's k best stay while the chunks pass (so that a chunk is read once).
    part_rows = max(1, (budget // 8) // (k * 12)) if held is not None else max(1, len(tests))
    vote_rows = max(1, (budget // 8) // (n_classes * 8))  # the class votes: float64 per row and class
    predicted = [np.zeros(0, dtype=np.int64)]
    for first in range(0, len(tests), part_rows):
        part = tests[first:first + part_rows]
        best = torch.full((len(part), k), -float("inf"), device=device)
        best_class = torch.zeros((len(part), k), dtype=torch.long, device=device)
        for start in starts:
            chunk_rows = held if held is not None else _held_chunk(stream, split, chunk, budget, start)
            chunk_labels = train_labels[start:start + chunk]
            done = 0
            for here, block in stream.blocks(block_rows, part):
                rows = slice(done, done + len(here))
                similarity = _unit(block) @ chunk_rows.T
                top, where = similarity.topk(min(k, similarity.shape[1]), dim=1)
                merged = torch.cat([best[rows], top], dim=1)
                classes = torch.cat([best_class[rows], chunk_labels[where]], dim=1)
                best[rows], keep = merged.topk(k, dim=1)
                best_class[rows] = classes.gather(1, keep)
                done += len(here)
            del chunk_rows
        for at in range(0, len(part), vote_rows):
            rows = slice(at, at + vote_rows)
            votes = torch.zeros((len(best[rows]), n_classes), dtype=torch.float64, device=device)
            votes.scatter_add_(1, best_class[rows], torch.exp(best[rows].double() / temperature))
            predicted.append(votes.argmax(1).cpu().numpy())
    y_pred = stream.ranks.joined(np.concatenate(predicted))
    y_true = stream.labels[split.test]
    return ProbeResult(
        layer=stream.name, dim=stream.dim, accuracy=float((y_pred == y_true).mean()),
        balanced_accuracy=balanced_accuracy(y_true, y_pred), C=None, scaling=stream.scaling,
        train_seconds=time.perf_counter() - started, kernel_form=False, n_train=len(split.train),
        n_test=len(split.test), converged=True, probe="knn", y_true=y_true.astype(np.int32),
        y_pred=y_pred.astype(np.int32)), None


register(Probe(
    "knn", "k-NN", "the k nearest training images by cosine similarity vote, weighted exp(similarity / T)",
    train_layer, chooses_C=False, params=(
        ProbeParam("k", NEIGHBOURS, "neighbours that vote", 1, 1000, whole=True),
        ProbeParam("temperature", TEMPERATURE, "T: how much more a closer neighbour's vote counts",
                   0.001, 100.0))))
