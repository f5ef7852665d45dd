"""The task's training batches: ``--reweight-chunks`` (a micro-batch trained as consecutive chunks
of its sentences) and fairseq 0.12's epoch iterator made as at epoch 1, so that a resumed run
draws the batches of the run it continues.
"""
import contextlib

import torch

from fairseq_reweight.nmt.fairseq_contract import batch_rows


def row_chunks(sample, parts: int, pad: int) -> list:
    """``parts`` consecutive row chunks of ``sample`` (at most one per sentence), or ``[sample]``
    where that is one chunk or fewer (a dummy batch has no rows)."""
    rows = sample["target"].size(0) if sample and "target" in sample else 0
    parts = min(parts, rows)
    if parts <= 1:
        return [sample]
    return [batch_rows(sample, index, pad) for index in torch.arange(rows).tensor_split(parts)]


def train_chunks(chunks: list, model, train_one):
    """``train_one(chunk) -> (loss, sample size, logging output)`` for each chunk, summed. The
    replay can only be as fine as the training step: a chunk's dropout masks are drawn in its own
    forward, so the chunks are trained as they will be replayed, one after the other; under data
    parallelism the gradients are all-reduced after the last one only (``model.no_sync()``)."""
    if len(chunks) == 1:
        return train_one(chunks[0])
    total_loss, total_size, merged = 0.0, 0, {}
    for index, chunk in enumerate(chunks):
        sync = index == len(chunks) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            loss, size, logging_output = train_one(chunk)
        total_loss, total_size = total_loss + loss.detach(), total_size + size
        for key, value in logging_output.items():
            merged[key] = merged.get(key, 0) + value
    return total_loss, total_size, merged


def iterator_as_at_epoch_one(get_batch_iterator, cache: dict, dataset, epoch: int, **kwargs):
    """``get_batch_iterator(dataset, epoch=1, **kwargs)`` (fairseq's), a new iterator then moved
    to ``epoch``. fairseq 0.12 orders the examples (ties among equal lengths broken at random) with
    numpy seed ``seed + epoch`` of the epoch the iterator is created in, then reuses that iterator
    (kept in ``cache``, the task's ``dataset_to_epoch_iter``) for every later epoch. A run resumed
    in epoch e > 1 would therefore draw other batches (the same sizes, other sentences) from then on
    than the run it continues; made as at epoch 1, its batches are an uninterrupted run's."""
    cached = cache.get(dataset)
    iterator = get_batch_iterator(dataset, epoch=1, **kwargs)
    if iterator is not cached and epoch > 1:
        iterator.epoch = epoch
        dataset.set_epoch(epoch)
    return iterator
