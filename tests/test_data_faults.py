"""Faults in the data and its destination ("fail early and clearly, never lose data"): images that do not
decode, empty class folders, a destination holding another data set or not writable, a split without
its manifest, a build killed with kill -9."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components import cli
from components.converters import Sample, Source, open_source
from components.data import ShardError, read_manifest
from components.shards import build_shards, verify_shards
from lcr_core.errors import LCRError
from tests.shard_samples import BAD_JPEG, colour_jpeg, colour_source


def write_image(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def one_line_cli_error(capsys, *argv: str) -> str:
    """Run `lcr ...`, expect exit 2 and one `lcr shards: error:` line on stderr; returns that line."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcr shards: error: ") and err.count("\n") == 1
    return err


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. Images that do not decode

def test_truncated_and_garbage_jpegs_are_left_out_counted_and_named(tmp_path, capsys):
    root, out = tmp_path / "folder", tmp_path / "out"
    good = colour_jpeg(5, size=64)
    write_image(root / "finch" / "good.jpg", good)
    write_image(root / "finch" / "cut.jpg", good[: len(good) // 2])  # a download that stopped half-way
    write_image(root / "wren" / "good.jpg", colour_jpeg(9))
    write_image(root / "wren" / "junk.jpg", BAD_JPEG)  # JPEG magic, then garbage
    write_image(root / "wren" / "empty.jpg", b"")

    assert cli.main(["shards", "build", "--source", "imagefolder", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("finch/cut.jpg", "wren/junk.jpg", "wren/empty.jpg"):
        assert f"{name}: undecodable image, left out" in printed
    assert "train: 2 samples, 1 shards (1 written, 0 already there), 3 unreadable left out" in printed
    manifest = read_manifest(str(out / "train"))
    assert manifest.total == 2 and manifest.unreadable == 3
    assert verify_shards(str(out), progress=False)["train"].total == 2


# ---------------------------------------------------------------------------------------------
# 2. Empty class folders

def test_empty_class_folder_is_left_out_with_a_warning(tmp_path, caplog):
    root = tmp_path / "folder"
    write_image(root / "train" / "finch" / "a.jpg", colour_jpeg(1))
    write_image(root / "train" / "wren" / "b.jpg", colour_jpeg(2))
    write_image(root / "test" / "wren" / "c.jpg", colour_jpeg(3))
    (root / "train" / "robin").mkdir()  # empty in train, absent from test
    (root / "train" / "jay" / "nested").mkdir(parents=True)  # no images, only a note
    (root / "train" / "jay" / "notes.txt").write_text("photos to come")
    (root / "test" / "jay").mkdir()

    with caplog.at_level(logging.WARNING, logger="lcr.converters"):
        source = open_source("imagefolder", root)
    assert source.class_names == ["finch", "wren"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("\n" not in w and "has no images" in w for w in warnings)
    assert f"{root / 'train' / 'jay'} and {root / 'test' / 'jay'}" in warnings[0]
    assert str(root / "train" / "robin") in warnings[1]

    built = build_shards(source, str(tmp_path / "out"), progress=False)
    assert built["train"].manifest.class_names == built["test"].manifest.class_names == ["finch", "wren"]
    assert built["test"].manifest.total == 1


# ---------------------------------------------------------------------------------------------
# 3. A destination holding another data set

def test_out_holding_another_data_set_is_refused_and_left_intact(tmp_path, capsys):
    out = tmp_path / "out"
    build_shards("synthetic", str(out), options={"num_classes": 3, "train_per_class": 2, "test_per_class": 1,
                                                 "image_size": 24}, progress=False)
    before = shard_bytes(out)
    root = tmp_path / "folder"
    for n, name in enumerate(("finch", "wren")):
        write_image(root / name / "a.jpg", colour_jpeg(n))
    build = ["shards", "build", "--source", "imagefolder", "--root", str(root), "--out", str(out)]

    err = one_line_cli_error(capsys, *build)
    assert "holds synthetic, not ImageFolder" in err and "--overwrite" in err
    assert shard_bytes(out) == before  # nothing deleted, nothing added
    assert cli.main(["shards", "verify", str(out)]) == 0

    assert cli.main([*build, "--overwrite"]) == 0
    capsys.readouterr()
    assert read_manifest(str(out / "train")).class_names == ["finch", "wren"]
    assert not (out / "test").exists() or not list((out / "test").iterdir())  # the old test split went too
    assert set(verify_shards(str(out), progress=False)) == {"train"}


def test_the_manifest_records_the_root_and_another_root_is_refused(tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    write_image(first / "finch" / "a.jpg", colour_jpeg(1))
    shutil.copytree(first, second)
    build_shards("imagefolder", str(out), first, progress=False)
    assert read_manifest(str(out / "train")).options == {"root": str(first.resolve())}
    build_shards("imagefolder", str(out), first, progress=False)  # the same source again: fine

    refused = f"holds ImageFolder from {first.resolve()}, not from {second.resolve()}"
    with pytest.raises(LCRError, match=re.escape(refused)):
        build_shards("imagefolder", str(out), second, progress=False)

    manifest_path = out / "train" / "manifest.json"  # a manifest written before roots were recorded
    raw = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(raw | {"options": {}}))
    build_shards("imagefolder", str(out), second, progress=False)
    assert read_manifest(str(out / "train")).options == {"root": str(second.resolve())}

    manifest_path.write_text("{not json")  # what it describes is unknown: not replaced unasked either
    with pytest.raises(LCRError, match="out/train: holds a manifest that cannot be read"):
        build_shards("imagefolder", str(out), second, progress=False)
    build_shards("imagefolder", str(out), second, progress=False, overwrite=True)
    assert read_manifest(str(out / "train")).total == 1


def test_a_split_beside_a_sibling_with_other_classes_is_refused(tmp_path, caplog):
    out = tmp_path / "out"
    build_shards(colour_source({"test": 4}, num_classes=3), str(out), progress=False)
    before = shard_bytes(out)
    four_classes = colour_source({"train": 8}, num_classes=4)

    with pytest.raises(LCRError, match=r"out/test: holds another class list \(3 classes; this build has 4\)"):
        build_shards(four_classes, str(out), splits=["train"], progress=False)
    assert shard_bytes(out) == before and not (out / "train").exists()

    with caplog.at_level(logging.WARNING, logger="lcr.shards"):
        build_shards(four_classes, str(out), splits=["train"], progress=False, overwrite=True)
    assert "out/test: removed (--overwrite): it held another class list" in caplog.text
    assert not list((out / "test").iterdir())  # no split with other classes is left beside the new one
    assert set(verify_shards(str(out), progress=False)) == {"train"}


# ---------------------------------------------------------------------------------------------
# 4. A split without its manifest

def test_verify_fails_naming_a_split_whose_manifest_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    build_shards(colour_source({"train": 6, "test": 4}), str(out), maxcount=3, progress=False)
    (out / "test" / "manifest.json").unlink()
    err = one_line_cli_error(capsys, "shards", "verify", str(out))
    assert "split test has no manifest.json" in err and "split train" not in err
    assert "split test has no manifest.json" in one_line_cli_error(capsys, "shards", "verify", str(out / "test"))
    with pytest.raises(ShardError, match="split test has no manifest.json"):
        verify_shards(str(out), progress=False)


# ---------------------------------------------------------------------------------------------
# 5. A destination that is a file or cannot be written

def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    file = tmp_path / "shards.tar"
    file.write_bytes(b"keep me")
    build = ["shards", "build", "--source", "synthetic", "--option", "num_classes=2"]
    assert f"--out {file}: is a file; expected a folder" in one_line_cli_error(capsys, *build, "--out", str(file))
    err = one_line_cli_error(capsys, *build, "--out", str(file / "sub"))
    assert f"--out {file / 'sub'}: cannot write there (Not a directory)" in err
    assert file.read_bytes() == b"keep me"


@pytest.fixture
def unwritable(tmp_path) -> Iterator[Path]:
    """A folder this process cannot create: below a chmod 0o555 folder, or for root (whom chmod does not
    stop) below /sys, where new folders are refused."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
        yield folder / "out"
        folder.chmod(0o755)
        return
    probe = Path("/sys/lcr-test-out")
    try:
        probe.mkdir()
    except OSError:
        yield probe
        return
    probe.rmdir()
    pytest.skip("running as root and /sys accepts new folders: no read-only place to test with")


def test_out_that_cannot_be_written_is_a_one_line_error(unwritable, capsys):
    err = one_line_cli_error(capsys, "shards", "build", "--source", "synthetic", "--option", "num_classes=2",
                             "--out", str(unwritable))
    assert f"--out {unwritable}: cannot write there (" in err and "expected a writable folder" in err


# ---------------------------------------------------------------------------------------------
# 6. A build killed with kill -9

def hanging(source: Source, split: str, after: int, started) -> Source:
    """The same source, but reading `split` blocks after `after` samples (having set `started`)."""
    def samples() -> Iterator[Sample]:
        for n, sample in enumerate(source.splits[split]()):
            if n == after:
                started.set()
                time.sleep(600)
            yield sample

    return Source(source.dataset, source.class_names, {**source.splits, split: samples}, source.sizes)


def kill_build_midway(source: Source, out: str) -> None:
    """Build `source`'s train split in a forked process and kill it with SIGKILL while it is writing."""
    context = multiprocessing.get_context("fork")
    started = context.Event()
    process = context.Process(target=build_shards, args=(hanging(source, "train", 10, started), out),
                              kwargs={"splits": ["train"], "maxcount": 4, "progress": False})
    process.start()
    try:
        assert started.wait(60), "the build never reached its tenth sample"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL


def test_a_killed_build_leaves_staging_that_verify_names_and_the_next_build_removes(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    source = colour_source({"train": 20, "test": 4})
    build_shards(source, str(out), maxcount=4, progress=False)
    kill_build_midway(source, str(out))
    staging = list((out / "train").glob(".staging-*"))
    assert len(staging) == 1 and list(staging[0].glob("*.tar"))  # the shard it was writing

    err = one_line_cli_error(capsys, "shards", "verify", str(out))
    assert f"split train has no manifest.json ({staging[0]} left by a build that was killed)" in err

    rebuilt = build_shards(source, str(out), splits=["train"], maxcount=4, progress=False)["train"]
    assert not list((out / "train").glob(".staging-*"))
    assert (rebuilt.written, rebuilt.reused) == (0, 5)  # the shards published before the kill were kept
    assert set(verify_shards(str(out), progress=False)) == {"train", "test"}

    (out / "test" / ".staging-left").mkdir()  # beside a complete split: the shards are fine, a warning
    with caplog.at_level(logging.WARNING, logger="lcr.shards"):
        assert cli.main(["shards", "verify", str(out)]) == 0
    assert f"{out / 'test' / '.staging-left'}: staging folder left by a build that was killed" in caplog.text


@pytest.mark.slow
def test_a_killed_upload_leaves_no_staging_behind_after_the_next_build(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # S3 builds stage in the temp folder
    out, source = f"s3://{s3_bucket}/colours", colour_source({"train": 20})
    kill_build_midway(source, out)
    assert len(list(tmp_path.glob(".staging-*"))) == 1
    (tmp_path / ".staging-of-another-build").mkdir()  # another destination's: not this build's to remove

    rebuilt = build_shards(source, out, maxcount=4, progress=False)["train"]
    assert (rebuilt.written, rebuilt.reused) == (3, 2)
    assert [p.name for p in tmp_path.glob(".staging-*")] == [".staging-of-another-build"]
