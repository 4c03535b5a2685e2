"""Reusable shared memory for the batches DataLoader workers send to the main process.

Why: torch hands a worker's batch to the main process through shared memory. Collating into
freshly allocated shared memory costs a page fault per 4 KiB page on every batch: writing a
16-frame 896x512 clip with its pose and reference (45 MB) into new shared memory took 28-30 ms on
a 2-core EPYC VM, into shared memory that was already mapped 2 ms (``fill_costs`` in
tools/benchmarks/bench_data.py). A worker decodes such a clip in about half a second, so fresh
memory costs ~5 % of the loader's throughput. A few buffers per worker,
reused once the main process has let go of a batch, pay those faults once.

The release protocol (DataLoader has none, so it is built here):

* The main process creates a :class:`ReleaseBoard` per DataLoader: one byte per
  ``(worker, buffer)`` in shared memory, handed to the workers with the dataset (it pickles for
  every start method).
* A worker (:class:`WorkerBuffers`) takes a buffer whose byte is 0, sets the byte to 1, collates
  into it and sends the batch. With every buffer still held it allocates fresh shared memory
  instead: it never waits, so a consumer that keeps batches costs speed, never a deadlock.
* The main process calls :meth:`ReleaseBoard.hold` on the batch's storage when it receives it.
  That sets the byte back to 0 when the storage dies, i.e. when no tensor or view in the main
  process can read it any more: torch keeps one Python object per storage alive for as long as
  any tensor uses the storage, and the finalizer hangs on that object.

So a worker never overwrites memory that the main process can still read.
"""
from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)


class ReleaseBoard:
    """One byte per ``(worker, buffer)``: 1 while the main process may read the buffer."""

    def __init__(self, workers: int, buffers_per_worker: int):
        if workers < 1 or buffers_per_worker < 1:
            raise ValueError(f"a release board needs >= 1 worker and buffer, got {workers} x {buffers_per_worker}")
        self.buffers_per_worker = buffers_per_worker
        self.flags = torch.zeros(workers * buffers_per_worker, dtype=torch.uint8).share_memory_()

    def hold(self, index: int, storage: torch.UntypedStorage) -> None:
        """Main process: buffer ``index`` stays taken until ``storage`` (the received batch's
        memory) is garbage."""
        weakref.finalize(storage, _release, self.flags, index)


def _release(flags: torch.Tensor, index: int) -> None:
    flags[index] = 0


class WorkerBuffers:
    """A worker's ring of shared-memory buffers on a :class:`ReleaseBoard`."""

    def __init__(self, board: ReleaseBoard, worker: int):
        self.board = board
        self.first = worker * board.buffers_per_worker
        self.storages: list[torch.UntypedStorage | None] = [None] * board.buffers_per_worker
        self.fresh = 0  # batches that found every buffer held

    def take(self, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """``(board index, storage of >= nbytes bytes)``; index -1: fresh memory, nothing to release."""
        flags = self.board.flags.numpy()
        for slot, storage in enumerate(self.storages):
            index = self.first + slot
            if flags[index]:
                continue
            if storage is None or storage.nbytes() < nbytes:
                # Grows to the largest bucket seen; the old buffer is free (its byte is 0).
                storage = self.storages[slot] = torch.UntypedStorage._new_shared(nbytes)
            flags[index] = 1
            return index, storage
        if self.fresh == 0:
            log.warning("all %d shared-memory batch buffers of this worker are still held by the "
                        "main process; sending batches in fresh shared memory (slower). Raise "
                        "data.shm_buffers if the consumer keeps more batches alive.", len(self.storages))
        self.fresh += 1
        return -1, torch.UntypedStorage._new_shared(nbytes)
