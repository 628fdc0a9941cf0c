"""The shard step: convert a data set into WebDataset shards with a manifest, and verify them.

    lcr shards build --source cub --root /data/CUB_200_2011 --out s3://bucket/cub [--split train]
    lcr shards verify s3://bucket/cub

Layout under DEST: `<split>/<split>-NNNNNN.tar` (`{key}.jpg`, `{key}.cls`, `{key}.json` per sample)
and `<split>/manifest.json`. Safety under interruption comes from the order of writes: the split's old
manifest is deleted first, each shard is staged locally and appears at DEST only complete (an atomic
rename, or a completed multipart upload), and the manifest is written last; only then are the
shards of an earlier, larger build that it no longer names deleted. A re-run writes
byte-identical shards (fixed sample order and tar timestamps) and skips every shard whose sha256 is
already at DEST, so nothing uploaded before an interruption is uploaded again. A build killed outright
(kill -9) leaves its staging folder behind; the next build of that split removes it, and `verify`
names it meanwhile.

Nothing already written is replaced by accident: a build refuses (unless `--overwrite`) to write
where a split of another data set, root or class list is, whether it is one of the splits being
built or a sibling (all splits under DEST must share one class list, or probes compare unrelated
labels). Every image is decoded in full before it is written; one that does not decode is left out,
counted in the manifest's `unreadable` and named on the console.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from components import storage
from components.converters import SOURCES, Sample, Source, open_image, open_source, parse_options
from components.data import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    ShardError,
    manifest_uri,
    read_manifest,
    tar_samples,
)
from lcr_core.errors import LCRError

DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 512 * 1024 * 1024
JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed member timestamps: the same samples give byte-identical shards
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
JPEG_MAGIC = b"\xff\xd8\xff"
STAGING_PREFIX = ".staging-"

log = logging.getLogger("lcr.shards")


def tool_version() -> str:
    try:
        return version("lcr")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class SplitBuild:
    """What building one split did: the manifest written, and how many shards had to be written."""

    uri: str
    manifest: Manifest
    written: int  # shards written to DEST
    reused: int  # shards already at DEST with the same sha256


def jpeg_bytes(image: bytes | Image.Image) -> bytes | None:
    """JPEG bytes pass through untouched once they decode in full (a truncated or garbage JPEG starts
    like a good one); other encodings and PIL images are encoded as JPEG. None when the bytes cannot
    be decoded."""
    if isinstance(image, bytes):
        decoded = open_image(image)
        if decoded is None:
            return None
        if image.startswith(JPEG_MAGIC):
            return image
        image = decoded
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def encode_sample(sample: Sample, jpg: bytes) -> dict[str, bytes | str]:
    return {
        "__key__": sample.key,
        "jpg": jpg,
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(sample.meta, sort_keys=True, default=_json_default).encode("utf-8"),
    }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(split: str, name: str) -> bool:
    """Whether `name` is one that `shard_name(split, ...)` gives."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


class _ShardSequence:
    """Writes samples into staged shards of at most `maxcount` samples / `maxsize` bytes and publishes
    each one to `split_uri` as soon as it is closed."""

    def __init__(self, split: str, split_uri: str, staging: Path, maxcount: int, maxsize: int, upload_bar: tqdm):
        self.split, self.split_uri, self.staging = split, split_uri, staging
        self.maxcount, self.maxsize, self.upload_bar = maxcount, maxsize, upload_bar
        self.entries: list[ShardEntry] = []
        self.written = self.reused = 0
        self.writer: TarWriter | None = None
        self.path: Path | None = None
        self.count = self.size = 0

    def write(self, sample: dict[str, bytes | str]) -> None:
        if self.writer is not None and (self.count >= self.maxcount or self.size >= self.maxsize):
            self.close_shard()
        if self.writer is None:
            self.path = self.staging / shard_name(self.split, len(self.entries))
            self.writer = TarWriter(str(self.path), encoder=False, mtime=TAR_MTIME)
            self.count = self.size = 0
        self.size += self.writer.write(sample)
        self.count += 1

    def close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        sha256, size = storage.file_sha256(self.path), self.path.stat().st_size
        uri = storage.join(self.split_uri, self.path.name)
        if storage.put_file(self.path, uri, sha256, progress=self.upload_bar.update):
            self.written += 1
        else:
            self.reused += 1
        self.entries.append(ShardEntry(self.path.name, self.count, sha256, size))

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _staging(split_uri: str) -> tuple[str, str]:
    """(folder, name prefix) of the split's staging folders: next to a local destination (publishing is
    then a rename), in the temp folder for S3 under a prefix naming the destination. Folders left there
    by a build that was killed are removed first."""
    if storage.is_s3(split_uri):
        parent = tempfile.gettempdir()
        prefix = f"{STAGING_PREFIX}{hashlib.sha256(split_uri.encode()).hexdigest()[:16]}-"
    else:
        Path(split_uri).mkdir(parents=True, exist_ok=True)
        parent, prefix = split_uri, STAGING_PREFIX
    for stale in Path(parent).glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return parent, prefix


def leftover_staging(split_uri: str) -> list[str]:
    """Staging folders in a local split folder: a build of it was killed. (S3 builds stage elsewhere.)"""
    if storage.is_s3(split_uri):
        return []
    return [name for name in storage.list_dirs(split_uri) if name.startswith(STAGING_PREFIX)]


def write_split(source: Source, split: str, split_uri: str, maxcount: int = DEFAULT_MAXCOUNT,
                maxsize: int = DEFAULT_MAXSIZE, progress: bool = True) -> SplitBuild:
    storage.delete(manifest_uri(split_uri))  # it may describe shards this build is about to replace
    num_classes = len(source.class_names)
    keys: set[str] = set()
    unreadable = 0
    staging_parent, staging_prefix = _staging(split_uri)
    with tempfile.TemporaryDirectory(dir=staging_parent, prefix=staging_prefix) as staging, \
            tqdm(desc=f"{split}: publishing", unit="B", unit_scale=True, disable=not progress,
                 position=1, leave=False) as upload_bar:
        shards = _ShardSequence(split, split_uri, Path(staging), maxcount, maxsize, upload_bar)
        try:
            for sample in tqdm(source.splits[split](), total=source.sizes.get(split), unit="img",
                               desc=f"{source.dataset} {split}", disable=not progress):
                if not KEY_PATTERN.match(sample.key):
                    raise LCRError(f"{source.dataset} {split}: sample key {sample.key!r}: expected only "
                                   "letters, digits, '_' and '-' (WebDataset reads a dot as an extension)")
                if sample.key in keys:
                    raise LCRError(f"{source.dataset} {split}: sample key {sample.key!r} occurs twice; "
                                   "expected unique keys")
                if not 0 <= sample.label < num_classes:
                    raise LCRError(f"{source.dataset} {split}: sample {sample.key} has label {sample.label}; "
                                   f"expected 0..{num_classes - 1}")
                keys.add(sample.key)
                jpg = jpeg_bytes(sample.image)
                if jpg is None:
                    unreadable += 1
                    tqdm.write(f"{source.dataset} {split}: {sample.meta.get('file', sample.key)}: "
                               "undecodable image, left out")
                    continue
                shards.write(encode_sample(sample, jpg))
            shards.close_shard()
        finally:
            shards.abandon()
    total = sum(e.count for e in shards.entries)
    if total == 0:
        raise ShardError(f"{source.dataset} split {split!r}: no readable samples; expected at least one image")
    manifest = Manifest(dataset=source.dataset, split=split, class_names=list(source.class_names),
                        shards=shards.entries, total=total, tool_version=tool_version(),
                        options=source.options | ({"root": source.root} if source.root else {}),
                        unreadable=unreadable)
    storage.write_bytes(manifest_uri(split_uri), manifest.to_json().encode("utf-8"))  # last
    remove_shards(split, split_uri, keep={entry.name for entry in manifest.shards})
    return SplitBuild(split_uri, manifest, shards.written, shards.reused)


def remove_shards(split: str, split_uri: str, keep: set[str]) -> None:
    """Delete the split's shards not named in `keep`: those of an earlier, larger build, only after the
    new manifest is written (an interruption leaves extra files, never missing ones). Only shard
    names: nothing else in the folder is touched."""
    for name in storage.list_files(split_uri):
        if is_shard_name(split, name) and name not in keep:
            storage.delete(storage.join(split_uri, name))


def check_writable(out: str) -> None:
    """A local destination must be a folder this process can write to: found out before anything is
    deleted, and said in one line rather than as an OSError from deep inside the build."""
    if storage.is_s3(out):
        return
    if Path(out).exists() and not Path(out).is_dir():
        raise LCRError(f"--out {out}: is a file; expected a folder (or a path that does not exist yet)")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise LCRError(f"--out {out}: cannot write there ({err.strerror or err}); expected a writable "
                       "folder") from None


def foreign_splits(source: Source, out: str) -> dict[str, str]:
    """{split folder under `out` (an existing folder or S3 prefix): what it holds instead of `source`}."""
    found = {}
    for name in storage.list_dirs(out):
        uri = storage.join(out, name)
        if storage.exists(manifest_uri(uri)) and (what := _held_instead(uri, source)):
            found[uri] = what
    return found


def _held_instead(split_uri: str, source: Source) -> str | None:
    """What the split's manifest names that `source` is not: another data set, root or class list (or
    it cannot be read). Roots are compared only when both are known: older manifests have none."""
    try:
        old = read_manifest(split_uri)
    except ShardError as err:
        return f"a manifest that cannot be read ({err})"
    old_root = old.options.get("root")
    if old.dataset != source.dataset:
        return f"{old.dataset}, not {source.dataset}"
    if old_root and source.root and old_root != source.root:
        return f"{old.dataset} from {old_root}, not from {source.root}"
    if old.class_names != list(source.class_names):
        return f"another class list ({len(old.class_names)} classes; this build has {len(source.class_names)})"
    return None


def replace_foreign_splits(source: Source, out: str, splits: list[str], overwrite: bool) -> None:
    """Refuse to write where another data set is, unless `overwrite`; then remove such splits that
    this build does not write (the ones it writes are replaced), so that no two splits with different
    classes are left side by side."""
    found = foreign_splits(source, out)
    if found and not overwrite:
        uri, what = next(iter(found.items()))
        raise LCRError(f"{uri}: holds {what}; expected an empty destination or shards of this data set "
                       "(pass --overwrite to replace them)")
    for uri, what in found.items():
        if storage.name_of(uri) not in splits:
            storage.delete(manifest_uri(uri))
            remove_shards(storage.name_of(uri), uri, keep=set())
            log.warning("%s: removed (--overwrite): it held %s", uri, what)


def build_shards(source: str | Source, out: str, root: str | Path | None = None, *,
                 splits: Sequence[str] | None = None, maxcount: int = DEFAULT_MAXCOUNT,
                 maxsize: int = DEFAULT_MAXSIZE, options: dict | None = None,
                 progress: bool = True, overwrite: bool = False) -> dict[str, SplitBuild]:
    """Convert `source` (a name from SOURCES with its `root` and `options`, or a ready Source) into
    shards under `out` (a folder or s3://bucket/prefix), one sub-folder per split. Splits of another
    data set under `out` are an error, or with `overwrite` replaced."""
    if maxcount < 1 or maxsize < 1:
        raise LCRError(f"maxcount {maxcount}, maxsize {maxsize}: expected both >= 1")
    if isinstance(source, str):
        source = open_source(source, root, options)
    wanted = list(splits) if splits else list(source.splits)
    missing = [s for s in wanted if s not in source.splits]
    if missing:
        raise LCRError(f"split {missing[0]!r}: {source.dataset} has splits {', '.join(source.splits)}")
    check_writable(out)
    replace_foreign_splits(source, out, wanted, overwrite)
    return {split: write_split(source, split, storage.join(out, split), maxcount, maxsize, progress)
            for split in wanted}


# ---------------------------------------------------------------------------------------------
# Verification

class _HashingReader:
    """Passes reads through while hashing and counting the bytes."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(storage.HASH_BLOCK):
            pass


def check_shard(uri: str, entry: ShardEntry) -> str | None:
    """None if the shard matches its manifest entry, else what is wrong (one phrase)."""
    try:
        with storage.open_read(uri) as stream:
            reader = _HashingReader(stream)
            count = sum(1 for _ in tar_samples(reader, uri))
            reader.drain()
    except storage.NotFound:
        return f"{entry.name} missing"
    except ShardError:
        return f"{entry.name} truncated or corrupt tar"
    if reader.bytes != entry.bytes:
        return f"{entry.name} has {reader.bytes} bytes, manifest says {entry.bytes}"
    if reader.digest.hexdigest() != entry.sha256:
        return f"{entry.name} sha256 {reader.digest.hexdigest()[:12]}… != manifest {entry.sha256[:12]}…"
    if count != entry.count:
        return f"{entry.name} has {count} samples, manifest says {entry.count}"
    return None


def unfinished(split_uri: str) -> str | None:
    """What is wrong with a folder that holds shards or a staging folder but no manifest (a build of
    it did not finish, or its manifest was removed), else None."""
    staging = leftover_staging(split_uri)
    has_shards = any(is_shard_name(storage.name_of(split_uri), f) for f in storage.list_files(split_uri))
    if not (staging or has_shards):
        return None
    left = f" ({storage.join(split_uri, staging[0])} left by a build that was killed)" if staging else ""
    return f"split {storage.name_of(split_uri)} has no {MANIFEST_NAME}{left}"


def split_uris(dest: str) -> list[str]:
    """DEST itself if it is a split (has a manifest), else its sub-folders that are. A folder with shards
    but no manifest is an error naming it: verifying the other splits alone would pass a data set
    with a split missing."""
    if storage.exists(manifest_uri(dest)):
        return [dest]
    folders = [storage.join(dest, d) for d in storage.list_dirs(dest) if not d.startswith(STAGING_PREFIX)]
    found = [uri for uri in folders if storage.exists(manifest_uri(uri))]
    problems = [problem for uri in [dest, *folders] if uri not in found and (problem := unfinished(uri))]
    if problems:
        raise ShardError(f"{dest}: {'; '.join(problems)}; expected a finished build of every split "
                         "(run `lcr shards build` for it again)")
    if not found:
        raise ShardError(f"{dest}: no {MANIFEST_NAME} in it or in its sub-folders; expected shards built "
                         "by `lcr shards build`")
    return found


def verify_shards(dest: str, progress: bool = True) -> dict[str, Manifest]:
    """Recompute every shard's checksum, size and sample count against its manifest. A staging folder
    beside a manifest (no danger to the shards: the next build of the split removes it) is a warning."""
    manifests = {uri: read_manifest(uri) for uri in split_uris(dest)}
    for uri in manifests:
        for name in leftover_staging(uri):
            log.warning("%s: staging folder left by a build that was killed; the next build of this split "
                        "removes it", storage.join(uri, name))
    jobs = [(m.split, storage.join(uri, e.name), e) for uri, m in manifests.items() for e in m.shards]
    problems = []
    for split, shard_uri, entry in tqdm(jobs, desc="verifying", unit="shard", disable=not progress):
        problem = check_shard(shard_uri, entry)
        if problem:
            problems.append(f"{split}/{problem}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ShardError(f"{dest}: {len(problems)} of {len(jobs)} shards failed verification: {shown}")
    return {m.split: m for m in manifests.values()}


# ---------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="convert a data set into shards with a manifest")
    build.add_argument("--source", required=True, choices=SOURCES)
    build.add_argument("--root", help="the data set's root folder (not used by synthetic)")
    build.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix")
    build.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                       help="build only this split (repeatable; default: all the source has)")
    build.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    build.add_argument("--maxsize", type=int, default=DEFAULT_MAXSIZE, help="bytes per shard at most")
    build.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="converter option: aircraft level=variant|family|manufacturer; "
                            "inat2019 supercategory=Birds; synthetic any SyntheticSpec field")
    build.add_argument("--overwrite", action="store_true",
                       help="replace splits under --out that hold another data set, root or class list")
    verify = actions.add_parser("verify", help="recompute checksums and counts against the manifests")
    verify.add_argument("dest", help="a split folder, or the folder holding the splits (or s3:// prefix)")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        built = build_shards(args.source, args.out, args.root, splits=args.splits, maxcount=args.maxcount,
                             maxsize=args.maxsize, options=parse_options(args.option), overwrite=args.overwrite)
        for split, result in built.items():
            m = result.manifest
            print(f"{split}: {m.total} samples, {len(m.shards)} shards ({result.written} written, "
                  f"{result.reused} already there), {m.unreadable} unreadable left out -> {result.uri}")
        return 0
    for split, m in verify_shards(args.dest).items():
        print(f"{split}: {len(m.shards)} shards, {m.total} samples: OK")
    return 0
