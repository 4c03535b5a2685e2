"""Reusable shared-memory batch buffers: reused only once the main process let go of a batch."""
import gc
import logging

import pytest
import torch

from datapipes.batch_buffers import ReleaseBoard, WorkerBuffers
from datapipes.clips import collate, images_nbytes
from datapipes.loader import build_clip_loader
from tests.data.conftest import loader_config


def test_a_buffer_comes_back_only_when_no_tensor_or_view_uses_it(caplog):
    board = ReleaseBoard(workers=2, buffers_per_worker=2)
    buffers = WorkerBuffers(board, worker=1)
    index, storage = buffers.take(1000)
    assert index == 2 and storage.nbytes() >= 1000 and storage.is_shared()
    # Stands in for the main process's own mapping of that memory (a storage of its own).
    received = torch.zeros(10, 100, dtype=torch.uint8)
    board.hold(index, received.untyped_storage())
    view = received[3]
    as_numpy = view.numpy()
    del received, view
    gc.collect()
    assert board.flags.tolist() == [0, 0, 1, 0]   # the numpy array still reads it
    second, _ = buffers.take(1000)
    assert second == 3
    del as_numpy
    gc.collect()
    assert board.flags.tolist() == [0, 0, 0, 1]
    again, reused = buffers.take(500)
    assert again == 2 and reused is buffers.storages[0]      # the same memory, not a new segment
    assert board.flags.tolist() == [0, 0, 1, 1]
    with caplog.at_level(logging.WARNING, logger="datapipes.batch_buffers"):
        fresh, memory = buffers.take(10_000)
    assert fresh == -1 and memory.nbytes() >= 10_000 and buffers.fresh == 1
    assert "Raise data.shm_buffers" in caplog.text
    board.flags[2] = 0
    grown, bigger = buffers.take(10_000)
    assert grown == 2 and bigger.nbytes() >= 10_000       # a buffer grows to the largest batch


def test_collate_lays_every_image_of_a_batch_in_one_storage(portrait_shards):
    batch = next(iter(build_clip_loader(loader_config(portrait_shards, with_face=True, output_dtype="uint8"), 0, 1)))
    samples = [{name: value[i] for name, value in batch.items() if name != "__key__"} for i in range(2)]
    for sample, key in zip(samples, batch["__key__"]):
        sample["__key__"], sample["is_scene"] = key, bool(sample["is_scene"])
    storage = torch.UntypedStorage(images_nbytes(samples) + 64)
    again = collate(samples, storage)
    for name in ("video", "reference", "pose", "face"):
        assert torch.equal(again[name], batch[name]), name
        assert again[name].untyped_storage().data_ptr() == storage.data_ptr()
        assert again[name].data_ptr() % 64 == 0
    with pytest.raises(ValueError, match="need .* bytes, the buffer has 10"):
        collate(samples, torch.UntypedStorage(10))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_batches_in_reused_buffers_equal_those_in_fresh_memory(portrait_shards, start_method):
    settings = dict(num_workers=2, start_method=start_method, output_dtype="uint8", with_face=True,
                    scene_probability=0.5, batches_per_epoch=10, prefetch_factor=1)
    fresh = build_clip_loader(loader_config(portrait_shards, shm_buffers=0, **settings), 0, 1)
    expected = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in fresh]

    # A consumer that drops each batch: the workers reuse their buffers.
    streaming = build_clip_loader(loader_config(portrait_shards, shm_buffers=3, **settings), 0, 1)
    kept_views = []
    for got, want in zip(streaming, expected, strict=True):
        for name in ("video", "reference", "pose", "face", "frame_index", "is_scene"):
            assert torch.equal(got[name], want[name]), name
        kept_views.append(got["video"][0, 1])   # a view keeps its buffer taken
        if len(kept_views) > 2:
            kept_views.pop(0)
    assert streaming.stats()["fresh_shm_batches"] == 0
    del kept_views

    # A consumer that keeps every batch: held buffers are never overwritten; the workers fall
    # back to fresh shared memory.
    keeping = build_clip_loader(loader_config(portrait_shards, shm_buffers=2, **settings), 0, 1)
    kept = list(keeping)
    for got, want in zip(kept, expected, strict=True):
        for name in ("video", "reference", "pose", "face"):
            assert torch.equal(got[name], want[name]), name
    assert keeping.stats()["fresh_shm_batches"] == 10 - 2 * 2   # all but each worker's first two


def test_negative_shm_buffers_is_a_config_error(portrait_shards):
    with pytest.raises(ValueError, match="shm_buffers must be >= 0"):
        build_clip_loader(loader_config(portrait_shards, shm_buffers=-1), 0, 1)
