"""Position-addressed tar reading (datapipes.shards.TarSampleReader) over stdlib tarfile."""
import random
import shlex
import tarfile

import pytest

from datapipes import shards


@pytest.fixture(scope="module")
def long_name_shard(tmp_path_factory) -> str:
    """Keys longer than ustar's 100-byte name field: ShardWriter writes pax headers for them."""
    out = tmp_path_factory.mktemp("long")
    with shards.ShardSink(str(out), "long") as sink:
        for index in range(4):
            sink.write({"__key__": f"{'d' * 120}/clip{index}", "mp4": bytes([index]) * (700 + index),
                        "json": b'{"index": %d}' % index})
    return sink.urls[0]


def _sequential(url: str) -> list[shards.RawSample]:
    reader = shards.TarSampleReader([url])
    try:
        return list(reader.iter_shard(0))
    finally:
        reader.close()


def test_offsets_are_member_header_offsets_and_address_samples_in_any_order(long_name_shard):
    samples = _sequential(long_name_shard)
    assert [s.key.rsplit("/", 1)[1] for s in samples] == ["clip0", "clip1", "clip2", "clip3"]
    assert samples[2].members == {"mp4": bytes([2]) * 702, "json": b'{"index": 2}'}
    with tarfile.open(long_name_shard) as archive:
        header_offsets = {m.offset for m in archive.getmembers()}
    assert {s.offset for s in samples} <= header_offsets and samples[0].offset == 0
    next_offsets = [s.offset for s in samples[1:]] + [None]
    order = list(range(len(samples))) * 2
    random.Random(0).shuffle(order)  # backwards and repeated reads: remote streams must reopen
    for url in (long_name_shard, f"pipe:cat {shlex.quote(long_name_shard)}"):
        reader = shards.TarSampleReader([url], max_open=1)
        for index in order:
            sample, next_offset = reader.read(0, samples[index].offset)
            assert (sample.key, sample.members, next_offset) == (
                samples[index].key, samples[index].members, next_offsets[index]), url
        reader.close()


def test_remote_stream_reads_what_the_local_file_holds(portrait_shards):
    url = shards.expand_shard_urls(portrait_shards)[0]
    local, remote = _sequential(url), _sequential(f"pipe:cat {shlex.quote(url)}")
    assert [(s.key, s.offset, s.members) for s in remote] == [(s.key, s.offset, s.members) for s in local]


def test_corrupt_tar_header_is_an_error_naming_shard_and_byte(tmp_path, long_name_shard):
    samples = _sequential(long_name_shard)
    data = bytearray(open(long_name_shard, "rb").read())
    data[samples[1].offset + 130] ^= 0x7F  # inside the size field: checksum no longer matches
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    reader = shards.TarSampleReader([str(broken)])
    with pytest.raises(shards.TarFormatError, match=rf"broken\.tar.*byte {samples[1].offset}"):
        list(reader.iter_shard(0))
    with pytest.raises(shards.TarFormatError, match=r"broken\.tar.*no readable tar header"):
        reader.read(0, samples[1].offset)


def test_truncated_member_is_an_error_naming_the_member(tmp_path, long_name_shard):
    with tarfile.open(long_name_shard) as archive:
        video = next(m for m in archive.getmembers() if m.name.endswith("clip2.mp4"))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(long_name_shard, "rb").read()[:video.offset_data + 100])
    reader = shards.TarSampleReader([str(truncated)])
    with pytest.raises(shards.TarFormatError, match=r"truncated\.tar.*clip2\.mp4"):
        list(reader.iter_shard(0))


def test_an_archive_without_members_has_no_samples(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert _sequential(str(empty)) == []
