"""``xdyna-data inspect``: what a shard set holds, whether the loader would take every sample,
and how much of each human clip has a face and a person.

A sample fails inspection exactly when the loader would skip it: both run
:func:`datapipes.clips.check_sample` (metadata schema, members, clip length, pose and face JSON),
and both require the video to have the frame count and size its metadata states. On top of
that, unless ``verify`` is ``none``, every sample is decoded as ``pack`` does
(:func:`datapipes.validate.validate_members`), so a video that breaks at a frame the loader has
not drawn yet is found too.
"""
from __future__ import annotations

import multiprocessing
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from datapipes import schema, shards
from datapipes.clips import BadSample, ClipSpec, SampleDocuments, check_sample, check_video_facts
from datapipes.pose import person_frames
from datapipes.validate import BLACK_LEVEL, Rejected, Rules, validate_members
from datapipes.video import VideoDecodeError, open_video, read_frames

DEFAULT_MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class InspectOptions:
    """What to check: ``clip`` is the loader's clip (its ``num_frames``, ``frame_stride`` and
    ``pose_from`` matter; face tracks are always checked); ``verify`` how far to decode
    (``none``, or a :data:`datapipes.validate.VERIFY_LEVELS` level; pose-video coverage needs
    ``full``); a human clip whose face or person coverage is below ``min_coverage`` is flagged."""
    clip: ClipSpec = field(default_factory=lambda: ClipSpec(8, 1, ((1, 1),), with_face=True))
    verify: str = "ends"
    min_coverage: float = DEFAULT_MIN_COVERAGE


@dataclass
class Coverage:
    """Of one human clip's ``frames``: how many have a face in ``face.json`` and how many show a
    person (keypoints seen in ``pose.json``, or a pose-video frame that is not black); ``None``
    where unknown (no face track; a pose video below ``--verify full``)."""
    key: str
    frames: int
    face: int | None
    person: int | None
    pose_from: str

    def low(self, minimum: float) -> list[str]:
        return [name for name, count in (("face", self.face), ("person", self.person))
                if count is not None and count < minimum * self.frames]

    def __str__(self) -> str:
        def part(name: str, count: int | None) -> str:
            return f"{name} -" if count is None else f"{name} {count}/{self.frames} ({count / self.frames:.0%})"
        return f"{self.key}: {part('face', self.face)}, {part('person', self.person)} (from {self.pose_from})"


@dataclass
class ShardReport:
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    resolutions: Counter = field(default_factory=Counter)
    members: Counter = field(default_factory=Counter)
    frames: int = 0
    seconds: float = 0.0
    keys: list = field(default_factory=list)
    failures: list = field(default_factory=list)   # [(url, key, reason)]: the loader would skip these
    coverage: list = field(default_factory=list)   # [Coverage] of the human clips that pass

    def add(self, other: "ShardReport") -> None:
        self.samples += other.samples
        self.kinds.update(other.kinds)
        self.resolutions.update(other.resolutions)
        self.members.update(other.members)
        self.frames += other.frames
        self.seconds += other.seconds
        self.keys.extend(other.keys)
        self.failures.extend(other.failures)
        self.coverage.extend(other.coverage)

    def fail(self, url: str, key: str, reason: str) -> None:
        self.failures.append((url, key, " ".join(str(reason).split())))  # one line per problem


@dataclass
class InspectReport(ShardReport):
    urls: list = field(default_factory=list)
    min_coverage: float = DEFAULT_MIN_COVERAGE
    every_clip: bool = False  # list every clip's coverage, not only the low ones

    def low_coverage(self) -> list[Coverage]:
        return [clip for clip in self.coverage if clip.low(self.min_coverage)]

    def __str__(self) -> str:
        lines = [f"{len(self.urls)} shard(s): {shards.brace_pattern(self.urls)}",
                 f"{self.samples} sample(s): " + ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items())),
                 f"{self.frames} frames, {self.seconds / 60:.2f} min",
                 "resolutions (HxW): " + ", ".join(f"{r} x{n}" for r, n in self.resolutions.most_common()),
                 "members: " + ", ".join(f"{m} x{n}" for m, n in sorted(self.members.items()))]
        lines += self._coverage_lines()
        failed = len({key for _, key, _ in self.failures if key != "-"})  # "-": a shard-level problem
        if self.failures:
            lines.append(f"FAILED: {len(self.failures)} problem(s); the loader would skip {failed} of "
                         f"{self.samples} sample(s):")
            lines += [f"  {key} ({url}): {reason}" for url, key, reason in self.failures]
        else:
            lines.append("every sample passes the loader's checks")
        return "\n".join(lines)

    def _coverage_lines(self) -> list[str]:
        if not self.coverage:
            return []
        lines = []
        for name in ("face", "person"):
            known = [getattr(c, name) / c.frames for c in self.coverage if getattr(c, name) is not None]
            lines.append(f"{name} coverage: " + (f"mean {sum(known) / len(known):.0%} over {len(known)} human clip(s)"
                                                 if known else "unknown (no face.json)" if name == "face"
                                                 else "unknown (pose videos are decoded with --verify full)"))
        low = self.low_coverage()
        if low:
            lines.append(f"WARNING: {len(low)} human clip(s) with face or person coverage below {self.min_coverage:.0%}:")
            lines += [f"  {clip}" for clip in low]
        if self.every_clip:
            lines.append("coverage per human clip:")
            lines += [f"  {clip}" for clip in self.coverage]
        return lines

    def as_dict(self) -> dict:
        return {"urls": self.urls, "samples": self.samples, "kinds": dict(self.kinds),
                "resolutions": dict(self.resolutions), "members": dict(self.members),
                "frames": self.frames, "seconds": self.seconds,
                "failures": [list(f) for f in self.failures],
                "coverage": [vars(c) for c in self.coverage],
                "low_coverage": [c.key for c in self.low_coverage()], "min_coverage": self.min_coverage}


def inspect_sample(sample: shards.RawSample, options: InspectOptions) -> Coverage | None:
    """The coverage of a human clip (``None`` for a scene); :class:`BadSample` if the loader
    would skip the sample, :class:`~datapipes.validate.Rejected` if a member does not decode."""
    documents = check_sample(sample.key, sample.members, options.clip)
    meta = documents.meta
    if options.verify != "none":
        rules = Rules(min_frames=1, min_height=1, min_width=1, verify=options.verify)
        facts = validate_members(sample.key, sample.members, rules)
        check_video_facts(sample.key, meta, facts["num_frames"], (facts["height"], facts["width"]))
    return None if documents.pose is None else _coverage(sample, documents, options.verify)


def _coverage(sample: shards.RawSample, documents: SampleDocuments, verify: str) -> Coverage:
    frames = documents.meta["num_frames"]
    faces = None if documents.faces is None else sum(face is not None for face in documents.faces.faces)
    person = None
    if documents.keypoints is not None:
        person = int(person_frames(documents.keypoints.keypoints).sum())
    elif verify == "full":  # decoding a whole pose video is what --verify full asks for anyway
        person = _drawn_frames(sample.members[shards.POSE_VIDEO], f"{sample.key}.{shards.POSE_VIDEO}", frames)
    return Coverage(sample.key, frames, faces, person, documents.pose)


def _drawn_frames(data: bytes, name: str, frames: int) -> int:
    """Frames of a pose video that are not black (a skeleton was drawn), decoded in chunks."""
    try:
        reader = open_video(data, name)
        drawn = 0
        for start in range(0, frames, 64):
            chunk = read_frames(reader, range(start, min(start + 64, frames)), name, data)
            drawn += int((chunk.reshape(len(chunk), -1).max(axis=1) > BLACK_LEVEL).sum())
    except VideoDecodeError as error:
        raise Rejected(str(error)) from None
    return drawn


def inspect_shard(url: str, options: InspectOptions = InspectOptions()) -> ShardReport:
    """Counts, failures and coverage of one shard."""
    report = ShardReport()
    reader = shards.TarSampleReader([url])
    try:
        for sample in reader.iter_shard(0):
            report.samples += 1
            report.keys.append(sample.key)
            report.members.update(sample.members.keys())
            try:  # counted as stated whenever the metadata is readable, failing or not
                meta = sample.meta()
                report.kinds[meta["kind"]] += 1
                report.resolutions[f"{meta['height']}x{meta['width']}"] += 1
                report.frames += meta["num_frames"]
                report.seconds += meta["num_frames"] / meta["fps"]
            except schema.SchemaError:
                pass  # inspect_sample reports it
            try:
                coverage = inspect_sample(sample, options)
            except (BadSample, Rejected) as error:
                report.fail(url, sample.key, error.reason if isinstance(error, BadSample) else error)
                continue
            if coverage is not None:
                report.coverage.append(coverage)
    except shards.TarFormatError as error:
        report.fail(url, "-", error)
    except OSError as error:  # e.g. permission denied: a failure of this shard, not a crash
        report.fail(url, "-", f"cannot read the shard ({error.strerror or error})")
    finally:
        reader.close()
    return report


def _inspect_job(job: tuple[str, InspectOptions]) -> ShardReport:
    return inspect_shard(*job)


def inspect_shards(spec, options: InspectOptions = InspectOptions(), workers: int = 1,
                   progress: bool = False) -> InspectReport:
    """Report on every shard of ``spec`` (anything :func:`~datapipes.shards.expand_shard_urls`
    takes), in ``workers`` processes. A shard set without any sample is a failure too."""
    urls = shards.expand_shard_urls(spec)
    report = InspectReport(urls=urls, min_coverage=options.min_coverage)
    jobs = [(url, options) for url in urls]
    pool = multiprocessing.Pool(workers) if workers > 1 and len(urls) > 1 else None
    try:
        results = pool.imap(_inspect_job, jobs) if pool else map(_inspect_job, jobs)
        for shard_report in tqdm(results, total=len(urls), desc="inspect", unit="shard", disable=not progress):
            report.add(shard_report)
    finally:
        if pool:
            pool.close()
            pool.join()
    duplicates = [key for key, n in Counter(report.keys).items() if n > 1]
    for key in duplicates:
        report.fail("-", key, "key appears more than once in the shard set")
    if report.samples == 0:
        report.fail(shards.brace_pattern(urls), "-", "the shard set holds no samples")
    return report
