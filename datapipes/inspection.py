"""``xdyna-data inspect``: what a shard set holds, and whether every sample still decodes."""
from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from datapipes import shards
from datapipes.validate import Rejected, Rules, validate_members


@dataclass
class ShardReport:
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    resolutions: Counter = field(default_factory=Counter)
    members: Counter = field(default_factory=Counter)
    frames: int = 0
    seconds: float = 0.0
    keys: list = field(default_factory=list)
    failures: list = field(default_factory=list)   # [(url, key, reason)]

    def add(self, other: "ShardReport") -> None:
        self.samples += other.samples
        self.kinds.update(other.kinds)
        self.resolutions.update(other.resolutions)
        self.members.update(other.members)
        self.frames += other.frames
        self.seconds += other.seconds
        self.keys.extend(other.keys)
        self.failures.extend(other.failures)


@dataclass
class InspectReport(ShardReport):
    urls: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.urls)} shard(s): {shards.brace_pattern(self.urls)}",
                 f"{self.samples} sample(s): " + ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items())),
                 f"{self.frames} frames, {self.seconds / 60:.2f} min",
                 "resolutions (HxW): " + ", ".join(f"{r} x{n}" for r, n in self.resolutions.most_common()),
                 "members: " + ", ".join(f"{m} x{n}" for m, n in sorted(self.members.items()))]
        if self.failures:
            lines.append(f"{len(self.failures)} sample(s) FAILED:")
            lines += [f"  {key} ({url}): {reason}" for url, key, reason in self.failures]
        else:
            lines.append("every sample decodes")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"urls": self.urls, "samples": self.samples, "kinds": dict(self.kinds),
                "resolutions": dict(self.resolutions), "members": dict(self.members),
                "frames": self.frames, "seconds": self.seconds,
                "failures": [list(f) for f in self.failures]}


def inspect_shard(url: str, verify: str = "ends") -> ShardReport:
    """Counts of one shard; with ``verify`` != ``none`` every sample is decoded (see
    :data:`datapipes.validate.VERIFY_LEVELS`) and its metadata checked against the video."""
    report = ShardReport()
    reader = shards.TarSampleReader([url])
    rules = Rules(min_frames=1, min_height=1, min_width=1, verify=verify if verify != "none" else "open")
    try:
        for sample in reader.iter_shard(0):
            report.samples += 1
            report.keys.append(sample.key)
            report.members.update(sample.members.keys())
            try:
                meta = json.loads(sample.members[shards.META])
                report.kinds[meta["kind"]] += 1
                report.resolutions[f"{meta['height']}x{meta['width']}"] += 1
                report.frames += int(meta["num_frames"])
                report.seconds += int(meta["num_frames"]) / float(meta["fps"])
                if verify != "none":
                    facts = validate_members(sample.key, sample.members, rules)
                    stated = {name: meta[name] for name in ("num_frames", "height", "width")}
                    found = {name: facts[name] for name in stated}
                    if stated != found:
                        raise Rejected(f"metadata says {stated}, the video has {found}")
            except (KeyError, ValueError) as error:
                reason = f"metadata lacks {error}" if isinstance(error, KeyError) else str(error)
                report.failures.append((url, sample.key, reason))
    except shards.TarFormatError as error:
        report.failures.append((url, "-", str(error)))
    finally:
        reader.close()
    return report


def _inspect_job(job: tuple[str, str]) -> ShardReport:
    return inspect_shard(*job)


def inspect_shards(spec, verify: str = "ends", workers: int = 1, progress: bool = False) -> InspectReport:
    """Report on every shard of ``spec`` (anything :func:`~datapipes.shards.expand_shard_urls`
    takes), in ``workers`` processes."""
    urls = shards.expand_shard_urls(spec)
    report = InspectReport(urls=urls)
    jobs = [(url, verify) for url in urls]
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
    report.failures += [("-", key, "key appears more than once in the shard set") for key in duplicates]
    return report
