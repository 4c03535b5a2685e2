"""Shard format, shard-list expansion, shard writing and position-addressed tar reading.

A shard is a WebDataset tar: one sample per source video, members ``<key>.<member>``
(see ``docs/data.md``). The loader addresses every sample by ``(shard index, byte offset of its
first tar header)``; that position is what makes a loader resumable with a tiny state and lets a
worker re-read a pending sample without replaying the stream. Writing is ``webdataset.ShardWriter``;
reading is the standard library's ``tarfile`` (headers, pax, long names, member data) over
``webdataset.gopen`` streams for remote urls. webdataset's own ``tar_file_iterator`` is not used
for reading because it does not report where a member starts.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import braceexpand

from datapipes import schema

# Member names inside a sample (the part after the key's dot).
VIDEO = "mp4"
POSE_VIDEO = "pose.mp4"
POSE_KEYPOINTS = "pose.json"
FACE = "face.json"
META = "json"
MEMBERS = (VIDEO, POSE_VIDEO, POSE_KEYPOINTS, FACE, META)
KINDS = schema.KINDS
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


def check_key(key: str) -> str:
    """WebDataset splits a member name at the first dot of its basename: keys must have none."""
    if not key or not _KEY_RE.match(key) or key.startswith("/"):
        raise ValueError(f"sample key {key!r} must be non-empty letters, digits, '_', '-', '/' (no dots)")
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.pose.mp4" -> ("dir/abc", "pose.mp4")`` (WebDataset's key convention)."""
    directory, _, base = name.rpartition("/")
    stem, dot, member = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, member if dot else ""


def expand_shard_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard urls from a directory (its ``*.tar``, recursively, sorted), a brace pattern
    (``shards/train-{000000..000009}.tar``), a glob, a single file, a dataset index (``*.json``
    from ``xdyna-data pack --parts``: the shards it lists), or a list of those.

    Local paths must exist: a missing one raises ``FileNotFoundError`` naming it.
    Remote urls (``pipe:``, ``http(s)://`` ...) are passed through unchecked.
    """
    if spec is None:
        raise FileNotFoundError("no shard path given (data.shards is empty)")
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise FileNotFoundError("no shard path given (data.shards is an empty list)")
    urls: list[str] = []
    for item in specs:
        item = os.fspath(item)
        for pattern in braceexpand.braceexpand(item):
            urls.extend(_expand_one(pattern, original=item))
    return urls


def _expand_one(pattern: str, original: str) -> list[str]:
    if pattern.startswith(REMOTE_PREFIXES):
        return [pattern]
    path = pattern[len("file:"):] if pattern.startswith("file:") else pattern
    path = os.path.expanduser(path)
    if path.endswith(".json") and os.path.isfile(path):  # a dataset index (xdyna-data pack --parts)
        from datapipes.index import shards_of_index

        return [url for listed in shards_of_index(path) for url in _expand_one(listed, original=path)]
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
        if not found:
            raise FileNotFoundError(f"shard directory {path!r} holds no .tar shards")
        return found
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"shard pattern {original!r} matches no file")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path!r} does not exist (from {original!r})")
    if os.path.getsize(path) == 0:
        raise FileNotFoundError(f"shard {path!r} is empty (from {original!r})")
    return [path]


def brace_pattern(urls: Sequence[str]) -> str:
    """Compact ``dir/name-{000000..000003}.tar`` for consecutive numbered shards, for summaries."""
    match = [re.match(r"^(.*?)(\d+)(\.tar)$", url) for url in urls]
    if urls and all(match):
        prefixes = {m.group(1) for m in match}
        numbers = [m.group(2) for m in match]
        if len(prefixes) == 1 and len({len(n) for n in numbers}) == 1:
            return f"{prefixes.pop()}{{{numbers[0]}..{numbers[-1]}}}.tar" if len(urls) > 1 else urls[0]
    return ",".join(urls)


# ----------------------------------------------------------------------------- writing


def make_sample(key: str, video: bytes, meta: dict, pose_video: bytes | None = None,
                face: dict | None = None, pose_keypoints: dict | None = None) -> dict:
    """One shard sample as the member dict ``ShardWriter`` takes (all values bytes); every
    JSON member must match :mod:`datapipes.schema` (a ``SchemaError`` names the field)."""
    meta = schema.sample_meta(meta, check_key(key))
    sample = {"__key__": key, VIDEO: bytes(video), META: _json_bytes(meta)}
    if pose_video is not None:
        sample[POSE_VIDEO] = bytes(pose_video)
    if pose_keypoints is not None:
        schema.pose_keypoints(pose_keypoints, f"{key}.{POSE_KEYPOINTS}", meta["num_frames"])
        sample[POSE_KEYPOINTS] = _json_bytes(pose_keypoints)
    if face is not None:
        schema.face_track(face, f"{key}.{FACE}", meta["num_frames"])
        sample[FACE] = _json_bytes(face)
    return sample


def _json_bytes(value: dict) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON; the schema has rejected them already.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


class ShardSink:
    """``webdataset.ShardWriter`` with byte members only, remembering the shards it wrote."""

    def __init__(self, out_dir: str, prefix: str = "shard", max_count: int = 1000,
                 max_size: float = 1e9):
        os.makedirs(out_dir, exist_ok=True)
        self.pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
        self.urls: list[str] = []
        self.count = 0
        import webdataset  # here, not at the top: the config checks read shard names without it

        self._writer = webdataset.ShardWriter(self.pattern, maxcount=max_count, maxsize=max_size,
                                              verbose=0, encoder=False, post=self.urls.append)

    def write(self, sample: dict) -> None:
        self._writer.write(sample)
        self.count += 1

    def close(self) -> list[str]:
        self._writer.close()
        return self.urls

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- reading


@dataclass
class RawSample:
    """A sample's members as bytes, with its address in the shard set."""
    key: str
    members: dict[str, bytes]
    shard: int
    offset: int

    def meta(self) -> dict:
        """The validated metadata; a :class:`~datapipes.schema.SchemaError` if it is missing
        or does not match the schema."""
        return schema.sample_meta(self.members.get(META), self.key)


class TarFormatError(ValueError):
    """A shard is not a readable tar where a sample was expected (names the shard and byte)."""


class TarSampleReader:
    """Reads whole samples at byte offsets of tar shards, keeping open streams for reuse.

    Local shards are seeked; remote ones (``pipe:`` ...) are streamed forward and re-opened
    when asked for an earlier offset. One reader per worker (never share across a fork).
    """

    def __init__(self, urls: Sequence[str], max_open: int = 8):
        self.urls = list(urls)
        self.max_open = max_open
        self._open: dict[int, _ShardCursor] = {}

    def read(self, shard: int, offset: int) -> tuple[RawSample | None, int | None]:
        """The sample starting at ``offset`` of shard ``shard`` and the next sample's offset
        (``None`` at the end of the shard). Raises ``TarFormatError`` on a corrupt tar."""
        cursor = self._cursor(shard, offset)
        key, members = None, {}
        while cursor.member is not None:
            info = cursor.member
            if info.isreg():  # directories, links etc. are no sample members
                member_key, member = split_member_name(info.name)
                if key is None:
                    key = member_key
                elif member_key != key:
                    return RawSample(key, members, shard, offset), cursor.position
                members[member] = cursor.data()
            cursor.advance()
        return (None, None) if key is None else (RawSample(key, members, shard, offset), None)

    def iter_shard(self, shard: int, offset: int = 0) -> Iterator[RawSample]:
        while offset is not None:
            sample, offset = self.read(shard, offset)
            if sample is None:
                return
            yield sample

    def close(self) -> None:
        for cursor in self._open.values():
            cursor.close()
        self._open.clear()

    def _cursor(self, shard: int, offset: int) -> "_ShardCursor":
        cursor = self._open.pop(shard, None)
        if cursor is not None and (cursor.member is None or not cursor.skip_to(offset)):
            cursor.close()
            cursor = None
        if cursor is None:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open))).close()  # least recently used
            cursor = _ShardCursor(self.urls[shard], offset)
        self._open[shard] = cursor  # most recently used last
        return cursor


class _ShardCursor:
    """A forward ``tarfile`` stream over one shard, positioned at a member.

    ``tarfile`` parses the headers (ustar, pax, GNU long names) and reads member data; this
    class adds the one thing it lacks for exact resume: opening at the byte offset of a member
    header. A local shard is seeked there before the stream opens (tarfile's offsets are then
    relative to ``base``); a remote one is opened with ``webdataset.gopen`` and read forward.
    """

    def __init__(self, url: str, offset: int):
        self.url = url
        self.local = not url.startswith(REMOTE_PREFIXES)
        if self.local:
            self._raw = open(url[len("file:"):] if url.startswith("file:") else url, "rb")
            self._raw.seek(offset)
            self.base = offset
        else:
            import webdataset

            self._raw = webdataset.gopen(url, "rb")
            self.base = 0
        try:
            # Stream mode: never seeks backwards (pipes), skips member data by reading.
            self._tar = tarfile.open(fileobj=self._raw, mode="r|", bufsize=1 << 20)
            self.member = self._tar.next()
        except (tarfile.ReadError, OSError) as error:
            self.close()
            raise TarFormatError(f"shard {url!r}: no readable tar header at byte {self.base} ({error})") from None
        if self.member is not None and not self.skip_to(offset):
            self.close()
            raise TarFormatError(f"shard {url!r}: no tar member starts at byte {offset}")

    @property
    def position(self) -> int | None:
        """Byte offset in the shard of the current member's first header; ``None`` at the end."""
        return None if self.member is None else self.base + self.member.offset

    def skip_to(self, offset: int) -> bool:
        """Move forward to the member whose header starts at ``offset`` (or to the end of the
        archive); ``False`` when that needs going back or ``offset`` lies between headers."""
        while self.member is not None and self.position < offset and not self.local:
            self.advance()
        return self.member is None or self.position == offset

    def data(self) -> bytes:
        try:
            return self._tar.extractfile(self.member).read()
        except tarfile.ReadError as error:
            raise TarFormatError(f"shard {self.url!r}: member {self.member.name!r} at byte "
                                 f"{self.position}: {error}") from None

    def advance(self) -> None:
        """Go to the next member (``member`` is ``None`` at the end of the archive).

        Not ``TarFile.next()``: that treats a corrupt header after the first as the end of the
        archive and keeps every member in memory; ``TarInfo.fromtarfile`` raises instead.
        """
        self._tar.fileobj.seek(self._tar.offset)  # tarfile's position of the next header
        try:
            self.member = tarfile.TarInfo.fromtarfile(self._tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            self.member = None
        except tarfile.HeaderError as error:
            at = self.base + self._tar.offset
            raise TarFormatError(f"shard {self.url!r}: bad tar header at byte {at} ({error})") from None

    def close(self) -> None:
        self._raw.close()
