"""The shard step: convert a data set into WebDataset shards with a manifest, and verify them.

    lcr shards build --source cub --root /data/CUB_200_2011 --out s3://bucket/cub [--split train]
    lcr shards build --source inat2019 --root /data/drop-2 --out s3://bucket/inat --append
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

`--append` adds a new drop (another root, or synthetic `drop=N`) of the same data set, converted with
the same options, to the splits under DEST. Samples whose keys a split holds already are skipped (the
keys are read from the shards' tar headers: a local shard is seeked through, a bucket's is streamed
once); the others get the set's label of their class name (a drop with a class the set lacks is
refused) and go into new shards numbered after the last. Only then is a manifest of `version` + 1
written, listing the old shards unchanged and the new ones, with the drop's root and options under
`appends`; until that write the previous manifest stays in force, and shards of an interrupted append
are reused or removed by the next. An append with nothing new writes nothing: the manifest stays
byte-identical. With no split under DEST yet, `--append` is a plain build (the first drop).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from components import storage
from components.converters import SOURCES, Sample, Source, open_image, open_source, parse_options
from components.data import (
    MANIFEST_NAME,
    TAR_ERRORS,
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
    """What building one split did: the manifest in force, and how many shards had to be written."""

    uri: str
    manifest: Manifest
    written: int  # shards written to DEST
    reused: int  # shards already at DEST with the same sha256
    added: int  # samples this build put into the split (an append: the new ones only)
    already: int = 0  # samples of an append whose keys the split held already: skipped


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


def encode_sample(sample: Sample, jpg: bytes, label: int) -> dict[str, bytes | str]:
    return {
        "__key__": sample.key,
        "jpg": jpg,
        "cls": str(label).encode("ascii"),
        "json": json.dumps(sample.meta, sort_keys=True, default=_json_default).encode("utf-8"),
    }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(split: str, name: str) -> bool:
    """Whether `name` is one that `shard_name(split, ...)` gives."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


class _ShardSequence:
    """Writes samples into staged shards of at most `maxcount` samples / `maxsize` bytes, numbered from
    `first_index`, and publishes each one to `split_uri` as soon as it is closed."""

    def __init__(self, split: str, split_uri: str, staging: Path, maxcount: int, maxsize: int, first_index: int,
                 bar: tqdm):
        self.split, self.split_uri, self.staging = split, split_uri, staging
        self.maxcount, self.maxsize, self.first_index, self.bar = maxcount, maxsize, first_index, bar
        self.entries: list[ShardEntry] = []
        self.written = self.reused = 0
        self.writer: TarWriter | None = None
        self.path: Path | None = None
        self.count = self.size = 0

    def write(self, sample: dict[str, bytes | str]) -> None:
        if self.writer is not None and (self.count >= self.maxcount or self.size >= self.maxsize):
            self.close_shard()
        if self.writer is None:
            self.path = self.staging / shard_name(self.split, self.first_index + len(self.entries))
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
        self.bar.set_postfix_str(f"publishing {self.path.name}")  # an upload of a large shard takes a while
        if storage.put_file(self.path, uri, sha256):
            self.written += 1
        else:
            self.reused += 1
        self.entries.append(ShardEntry(self.path.name, self.count, sha256, size))
        self.bar.set_postfix_str(f"{len(self.entries)} shards published")

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


@dataclass
class _Published:
    """The shards one pass over a source split published, and the samples it left out."""

    entries: list[ShardEntry]
    written: int
    reused: int
    unreadable: int  # images that did not decode
    already: int  # samples whose keys were in `known`

    @property
    def samples(self) -> int:
        return sum(e.count for e in self.entries)


def publish_samples(source: Source, split: str, split_uri: str, *, labels: list[int], known: set[str],
                    first_index: int, maxcount: int, maxsize: int, progress: bool) -> _Published:
    """Write the source split's samples whose keys are not in `known` as shards numbered from
    `first_index`, each sample's label mapped through `labels` (source label -> label in the set).
    One progress bar: a second, nested one garbles the output of terminals and log collectors."""
    seen: set[str] = set()
    unreadable = already = 0
    staging_parent, staging_prefix = _staging(split_uri)
    with tempfile.TemporaryDirectory(dir=staging_parent, prefix=staging_prefix) as staging, \
            tqdm(total=source.sizes.get(split), unit="img", desc=f"{source.dataset} {split}",
                 disable=not progress, position=0) as bar:  # not below bars others left open
        shards = _ShardSequence(split, split_uri, Path(staging), maxcount, maxsize, first_index, bar)
        try:
            for sample in source.splits[split]():
                bar.update()
                _check_sample(source, split, sample, seen)
                seen.add(sample.key)
                if sample.key in known:
                    already += 1
                    continue
                jpg = jpeg_bytes(sample.image)
                if jpg is None:
                    unreadable += 1
                    tqdm.write(f"{source.dataset} {split}: {sample.meta.get('file', sample.key)}: "
                               "undecodable image, left out")
                    continue
                shards.write(encode_sample(sample, jpg, labels[sample.label]))
            shards.close_shard()
        finally:
            shards.abandon()
    return _Published(shards.entries, shards.written, shards.reused, unreadable, already)


def _check_sample(source: Source, split: str, sample: Sample, seen: set[str]) -> None:
    if not KEY_PATTERN.match(sample.key):
        raise LCRError(f"{source.dataset} {split}: sample key {sample.key!r}: expected only "
                       "letters, digits, '_' and '-' (WebDataset reads a dot as an extension)")
    if sample.key in seen:
        raise LCRError(f"{source.dataset} {split}: sample key {sample.key!r} occurs twice; expected unique keys")
    if not 0 <= sample.label < len(source.class_names):
        raise LCRError(f"{source.dataset} {split}: sample {sample.key} has label {sample.label}; "
                       f"expected 0..{len(source.class_names) - 1}")


def write_split(source: Source, split: str, split_uri: str, maxcount: int = DEFAULT_MAXCOUNT,
                maxsize: int = DEFAULT_MAXSIZE, progress: bool = True) -> SplitBuild:
    storage.delete(manifest_uri(split_uri))  # it may describe shards this build is about to replace
    published = publish_samples(source, split, split_uri, labels=list(range(len(source.class_names))),
                                known=set(), first_index=0, maxcount=maxcount, maxsize=maxsize, progress=progress)
    if published.samples == 0:
        raise ShardError(f"{source.dataset} split {split!r}: no readable samples; expected at least one image")
    manifest = Manifest(dataset=source.dataset, split=split, class_names=list(source.class_names),
                        shards=published.entries, total=published.samples, tool_version=tool_version(),
                        options=_provenance(source), unreadable=published.unreadable)
    publish_manifest(split_uri, manifest)
    return SplitBuild(split_uri, manifest, published.written, published.reused, published.samples)


def _provenance(source: Source) -> dict:
    return source.options | ({"root": source.root} if source.root else {})


def publish_manifest(split_uri: str, manifest: Manifest) -> None:
    """Write the manifest (atomically: a rename, or one PUT), then delete the shards it does not name."""
    storage.write_bytes(manifest_uri(split_uri), manifest.to_json().encode("utf-8"))
    remove_shards(manifest.split, split_uri, keep={entry.name for entry in manifest.shards})


# ---------------------------------------------------------------------------------------------
# Appending a new drop

DROP_OPTIONS = ("root", "drop")  # options that name a drop rather than how the set is converted


def append_split(source: Source, split: str, split_uri: str, base: Manifest, maxcount: int = DEFAULT_MAXCOUNT,
                 maxsize: int = DEFAULT_MAXSIZE, progress: bool = True) -> SplitBuild:
    """Add the source split's samples whose keys `base` (the split's manifest) does not hold, as new
    shards numbered after its last, then a manifest of version + 1 listing old and new shards. The old
    manifest stays in force until then; shards of an interrupted append are reused or removed here."""
    published = publish_samples(source, split, split_uri, labels=label_map(base, source, split_uri),
                                known=held_keys(base, split_uri), first_index=next_shard_index(base),
                                maxcount=maxcount, maxsize=maxsize, progress=progress)
    if published.samples == 0:
        remove_shards(split, split_uri, keep={entry.name for entry in base.shards})
        return SplitBuild(split_uri, base, 0, 0, 0, published.already)
    record = {"version": base.version + 1, "options": _provenance(source), "samples": published.samples,
              "unreadable": published.unreadable}
    manifest = replace(base, shards=base.shards + published.entries, total=base.total + published.samples,
                       tool_version=tool_version(), unreadable=base.unreadable + published.unreadable,
                       version=base.version + 1, appends=[*base.appends, record])
    publish_manifest(split_uri, manifest)
    return SplitBuild(split_uri, manifest, published.written, published.reused, published.samples,
                      published.already)


def label_map(base: Manifest, source: Source, split_uri: str) -> list[int]:
    """Source label -> the set's label of the same class name. A class the set does not have is refused:
    every earlier probe, feature cache and registered model counts the set's classes."""
    index = {name: label for label, name in enumerate(base.class_names)}
    unknown = [name for name in source.class_names if name not in index]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise LCRError(f"{split_uri}: the new drop has {len(unknown)} classes that the manifest's "
                       f"{len(base.class_names)} do not include ({shown}); expected only known classes "
                       "(build a new shard set to add classes)")
    return [index[name] for name in source.class_names]


def held_keys(manifest: Manifest, split_uri: str) -> set[str]:
    """The sample keys of the split's shards, each shard's count checked against the manifest (an append
    onto a damaged set would hide the damage under a new version)."""
    keys: set[str] = set()
    for entry, uri in zip(manifest.shards, manifest.shard_uris(split_uri)):
        found = shard_keys(uri)
        if len(found) != entry.count:
            raise ShardError(f"shard {uri}: {len(found)} samples, the manifest says {entry.count}; expected the "
                             "shards the manifest lists (check with `lcr shards verify`)")
        keys |= found
    return keys


def shard_keys(uri: str) -> set[str]:
    """The sample keys in a shard, from its tar headers: a local shard's images are skipped by seeking,
    an object in a bucket is streamed through once."""
    try:
        with storage.open_read(uri) as stream, \
                tarfile.open(fileobj=stream, mode="r:" if stream.seekable() else "r|") as tar:
            return {base_plus_ext(member.name)[0] for member in tar if member.isfile()}
    except TAR_ERRORS as err:
        raise ShardError(f"shard {uri}: truncated or corrupt tar ({err or type(err).__name__}); expected a "
                         "complete shard (check with `lcr shards verify`)") from None


def next_shard_index(manifest: Manifest) -> int:
    """One past the highest shard number the manifest names: appended shards never take an old name."""
    numbers = [int(entry.name[len(manifest.split) + 1:-len(".tar")]) for entry in manifest.shards
               if is_shard_name(manifest.split, entry.name)]
    return max(numbers, default=-1) + 1


def append_bases(source: Source, out: str, splits: list[str]) -> dict[str, Manifest] | None:
    """The manifest each split of an append adds to, all checked before anything is written; None when
    no split under `out` has one (the first drop is then a plain build)."""
    held = [name for name in storage.list_dirs(out) if storage.exists(manifest_uri(storage.join(out, name)))]
    if not held:
        return None
    missing = [split for split in splits if split not in held]
    if missing:
        raise LCRError(f"{storage.join(out, missing[0])}: no {MANIFEST_NAME} to append to, while {out} has "
                       f"split(s) {', '.join(held)}; expected --append onto existing splits (choose them with --split)")
    bases = {split: read_manifest(storage.join(out, split)) for split in splits}
    for split, base in bases.items():
        if what := _other_conversion(base, source):
            raise LCRError(f"{storage.join(out, split)}: holds {what}; expected a drop of the same data set, "
                           "converted with the same options")
        label_map(base, source, storage.join(out, split))
    return bases


def _other_conversion(base: Manifest, source: Source) -> str | None:
    """What the set holds that the drop is not: another data set, or one converted with other options
    (a drop's root and number naturally differ)."""
    if base.dataset != source.dataset:
        return f"{base.dataset}, not {source.dataset}"
    ours = {k: v for k, v in base.options.items() if k not in DROP_OPTIONS}
    theirs = {k: v for k, v in source.options.items() if k not in DROP_OPTIONS}
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        return (f"{base.dataset} converted with {', '.join(f'{k}={ours.get(k)!r}' for k in changed)}, "
                f"not {', '.join(f'{k}={theirs.get(k)!r}' for k in changed)}")
    return None


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
                 progress: bool = True, overwrite: bool = False, append: bool = False) -> dict[str, SplitBuild]:
    """Convert `source` (a name from SOURCES with its `root` and `options`, or a ready Source) into
    shards under `out` (a folder or s3://bucket/prefix), one sub-folder per split. Splits of another
    data set under `out` are an error, or with `overwrite` replaced. With `append`, the source is a new
    drop added to the splits under `out` (or, when there are none, built as the first drop)."""
    if maxcount < 1 or maxsize < 1:
        raise LCRError(f"maxcount {maxcount}, maxsize {maxsize}: expected both >= 1")
    if append and overwrite:
        raise LCRError("--append with --overwrite: expected one of them (--append keeps every shard there; "
                       "--overwrite replaces another data set's)")
    if isinstance(source, str):
        source = open_source(source, root, options)
    wanted = list(splits) if splits else list(source.splits)
    missing = [s for s in wanted if s not in source.splits]
    if missing:
        raise LCRError(f"split {missing[0]!r}: {source.dataset} has splits {', '.join(source.splits)}")
    check_writable(out)
    bases = append_bases(source, out, wanted) if append else None
    if bases:
        return {split: append_split(source, split, storage.join(out, split), base, maxcount, maxsize, progress)
                for split, base in bases.items()}
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
    with tqdm(jobs, desc="verifying", unit="shard", disable=not progress) as bar:  # closed on errors too
        for split, shard_uri, entry in bar:
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
                            "inat2019 supercategory=Birds; synthetic any SyntheticSpec field, and drop=N "
                            "(its next samples, a new drop for --append)")
    replacing = build.add_mutually_exclusive_group()
    replacing.add_argument("--overwrite", action="store_true",
                           help="replace splits under --out that hold another data set, root or class list")
    replacing.add_argument("--append", action="store_true",
                           help="add a new drop's samples (keys not yet there) to the splits under --out as new "
                                "shards and a new manifest version; with no split there yet, a plain build")
    verify = actions.add_parser("verify", help="recompute checksums and counts against the manifests")
    verify.add_argument("dest", help="a split folder, or the folder holding the splits (or s3:// prefix)")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        built = build_shards(args.source, args.out, args.root, splits=args.splits, maxcount=args.maxcount,
                             maxsize=args.maxsize, options=parse_options(args.option), overwrite=args.overwrite,
                             append=args.append)
        for split, result in built.items():
            print(f"{split}: {describe(result)}")
        return 0
    for split, m in verify_shards(args.dest).items():
        print(f"{split}: {len(m.shards)} shards, {m.total} samples: OK")
    return 0


def describe(result: SplitBuild) -> str:
    m = result.manifest
    if result.added == 0:
        return (f"nothing new ({result.already} samples already there); manifest version {m.version} "
                f"unchanged -> {result.uri}")
    appended = f"{result.added} new samples ({result.already} already there) appended, " if m.version > 1 else ""
    return (f"{appended}{m.total} samples, {len(m.shards)} shards ({result.written} written, {result.reused} "
            f"already there), {m.unreadable} unreadable left out, manifest version {m.version} -> {result.uri}")
