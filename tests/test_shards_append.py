"""`lcr shards build --append`: a new drop becomes new shards and a new manifest version; old shards are never
rewritten, a repeated append changes nothing, an interrupted one leaves the previous manifest in force."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from tqdm import tqdm

from components import cli
from components.converters import Sample, Source, open_source
from components.data import ShardError, eval_loader, parse_manifest, read_manifest
from components.shards import build_shards, verify_shards
from lcr_core.synthetic import SyntheticSpec
from tests.shard_samples import colour_jpeg, interrupted, key_of

CLASSES = ["class0", "class1", "class2"]


def colour_drop(first: int, count: int, class_names: list[str] = CLASSES) -> Source:
    """Colour samples first..first+count-1 of class CLASSES[i % 3], labelled by their place in `class_names`
    (a drop may list the set's classes in another order)."""
    def samples() -> Iterator[Sample]:
        for i in range(first, first + count):
            yield Sample(key_of(i), colour_jpeg(i), class_names.index(CLASSES[i % 3]), {"index": i})

    return Source("colours", list(class_names), {"train": samples}, {"train": count})


def labels_read_back(split_uri: str) -> dict[str, int]:
    loader = eval_loader(split_uri, image_size=16, resize=16, batch_size=8)
    return {key: int(label) for _, labels, keys in loader for key, label in zip(keys, labels)}


def expected_labels(indices) -> dict[str, int]:
    return {key_of(i): i % 3 for i in indices}


def tar_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_append_writes_new_shards_and_a_manifest_of_the_next_version(tmp_path):
    split = tmp_path / "train"
    first = build_shards(colour_drop(0, 10), str(tmp_path), maxcount=4, progress=False)["train"]
    old_shards = tar_digests(split)
    assert first.manifest.version == 1 and list(old_shards) == [f"train-00000{i}.tar" for i in range(3)]

    # 8 and 9 are in the set already; the drop lists the classes in another order
    drop = colour_drop(8, 10, class_names=["class2", "class0", "class1"])
    result = build_shards(drop, str(tmp_path), maxcount=4, progress=False, append=True)["train"]
    assert (result.added, result.already, result.written, result.reused) == (8, 2, 2, 0)

    manifest = read_manifest(str(split))
    assert manifest == result.manifest and manifest.version == 2 and manifest.total == 18
    assert manifest.class_names == CLASSES
    assert manifest.shards[:3] == first.manifest.shards  # old entries as they were, checksums included
    assert [e.name for e in manifest.shards[3:]] == ["train-000003.tar", "train-000004.tar"]
    assert [e.count for e in manifest.shards[3:]] == [4, 4]
    assert {k: v for k, v in tar_digests(split).items() if k in old_shards} == old_shards  # not rewritten
    for entry in manifest.shards:
        assert hashlib.sha256((split / entry.name).read_bytes()).hexdigest() == entry.sha256
    assert manifest.appends == [{"version": 2, "options": {}, "samples": 8, "unreadable": 0}]
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 18
    assert labels_read_back(str(split)) == expected_labels(range(18))  # class names, not drop indices, decide


def test_the_same_append_twice_changes_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "syn"
    spec = ["--option", "num_classes=3", "--option", "train_per_class=2", "--option", "test_per_class=1",
            "--option", "image_size=24"]
    assert cli.main(["shards", "build", "--source", "synthetic", "--out", str(out), *spec]) == 0
    append = ["shards", "build", "--source", "synthetic", "--out", str(out), "--append", *spec, "--option", "drop=1"]
    assert cli.main(append) == 0
    printed = capsys.readouterr().out
    assert "train: 6 new samples (0 already there) appended, 12 samples, 2 shards (1 written" in printed
    assert "test: 3 new samples (0 already there) appended, 6 samples, 2 shards" in printed
    assert "manifest version 2" in printed
    manifests = {split: (out / split / "manifest.json").read_bytes() for split in ("train", "test")}
    files = {split: sorted(p.name for p in (out / split).iterdir()) for split in ("train", "test")}

    assert cli.main(append) == 0
    printed = capsys.readouterr().out
    assert "train: nothing new (6 samples already there); manifest version 2 unchanged" in printed
    assert "test: nothing new (3 samples already there)" in printed
    assert {split: (out / split / "manifest.json").read_bytes() for split in manifests} == manifests
    assert {split: sorted(p.name for p in (out / split).iterdir()) for split in files} == files

    manifest = read_manifest(str(out / "train"))
    assert SyntheticSpec.from_options(manifest.options).train_per_class == 2  # the set's spec, as the demo reads it
    assert manifest.appends[0]["options"]["drop"] == 1
    keys = labels_read_back(str(out / "train"))
    assert sorted(keys) == [f"syn-train-{i:06d}" for i in range(12)]
    assert all(label == int(key[-6:]) % 3 for key, label in keys.items())


def test_an_interrupted_append_leaves_the_previous_manifest_and_the_next_one_cleans_up(tmp_path):
    split = tmp_path / "train"
    build_shards(colour_drop(0, 8), str(tmp_path), maxcount=3, progress=False)
    before = (split / "manifest.json").read_bytes()
    drop = colour_drop(8, 10)
    with pytest.raises(KeyboardInterrupt):  # dies on its 8th sample: two new shards are already published
        build_shards(interrupted(drop, "train", after=7), str(tmp_path), maxcount=3, progress=False, append=True)
    assert (split / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in split.glob("*.tar"))[-2:] == ["train-000003.tar", "train-000004.tar"]
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 8
    assert labels_read_back(str(split)) == expected_labels(range(8))  # readers see the old version only
    (split / ".staging-killed").mkdir()  # as a kill -9 leaves it
    (split / ".staging-killed" / "train-000009.tar").write_bytes(b"half")

    # one larger shard this time: it replaces the unlisted train-000003.tar and train-000004.tar goes
    result = build_shards(drop, str(tmp_path), maxcount=10, progress=False, append=True)["train"]
    assert (result.added, result.manifest.version) == (10, 2)
    assert [e.name for e in result.manifest.shards[3:]] == ["train-000003.tar"]
    assert sorted(p.name for p in split.iterdir()) == ["manifest.json"] + [f"train-00000{i}.tar" for i in range(4)]
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 18
    assert labels_read_back(str(split)) == expected_labels(range(18))


def test_an_append_with_nothing_new_still_removes_shards_an_interrupted_one_left(tmp_path):
    split = tmp_path / "train"
    build_shards(colour_drop(0, 4), str(tmp_path), maxcount=2, progress=False)
    before = (split / "manifest.json").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        build_shards(interrupted(colour_drop(4, 6), "train", after=3), str(tmp_path), maxcount=2, progress=False,
                     append=True)
    assert (split / "train-000002.tar").exists()  # published, listed nowhere
    result = build_shards(colour_drop(0, 4), str(tmp_path), maxcount=2, progress=False, append=True)["train"]
    assert (result.added, result.already) == (0, 4)
    assert (split / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in split.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar"]


@pytest.mark.slow
def test_append_in_a_bucket(s3_server, s3_bucket):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    dest, prefix = f"s3://{s3_bucket}/colours", "colours/train/"

    def listing() -> dict[str, str]:
        return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]}

    def manifest_body() -> bytes:
        return s3.get_object(Bucket=s3_bucket, Key=prefix + "manifest.json")["Body"].read()

    build_shards(colour_drop(0, 6), dest, maxcount=4, progress=False)
    old, before = listing(), manifest_body()
    drop = colour_drop(4, 10)  # 4 and 5 are there already
    with pytest.raises(KeyboardInterrupt):
        build_shards(interrupted(drop, "train", after=7), dest, maxcount=4, progress=False, append=True)
    assert manifest_body() == before and verify_shards(dest, progress=False)["train"].total == 6

    result = build_shards(drop, dest, maxcount=4, progress=False, append=True)["train"]
    assert (result.added, result.already, result.written, result.reused) == (8, 2, 1, 1)
    now = listing()
    assert {key: etag for key, etag in now.items() if key in old and key != prefix + "manifest.json"} == \
        {key: etag for key, etag in old.items() if key != prefix + "manifest.json"}  # old shards untouched
    assert sorted(now) == [prefix + "manifest.json"] + [f"{prefix}train-00000{i}.tar" for i in range(4)]
    manifest = read_manifest(f"{dest}/train")
    assert manifest.version == 2 and manifest.total == 14
    for entry in manifest.shards:
        stored = s3.head_object(Bucket=s3_bucket, Key=prefix + entry.name)["Metadata"]["sha256"]
        assert stored == entry.sha256
    assert verify_shards(dest, progress=False)["train"].total == 14
    assert labels_read_back(f"{dest}/train") == expected_labels(range(14))

    appended = manifest_body()
    again = build_shards(drop, dest, maxcount=4, progress=False, append=True)["train"]
    assert (again.added, again.already) == (0, 10) and manifest_body() == appended and listing() == now


def write_imagefolder(root: Path, classes: dict[str, int]) -> None:
    """root/<class>/<root name><i>.jpg: keys (class-file) differ from one drop folder to the next."""
    for number, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{root.name}{i}.jpg").write_bytes(colour_jpeg(10 * number + i))


def one_line_error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lcr shards: error: ") and captured.err.count("\n") == 1
    return captured.err


def test_a_drop_with_unknown_classes_or_other_options_is_refused_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    write_imagefolder(tmp_path / "first", {"crow": 2, "finch": 2})
    build_shards("imagefolder", str(out), tmp_path / "first", progress=False)
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    write_imagefolder(tmp_path / "unknown", {"crow": 1, "heron": 1, "ibis": 1, "jay": 1, "kite": 1})
    err = one_line_error(capsys, "shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "unknown"),
                         "--out", str(out), "--append")
    assert "the new drop has 4 classes that the manifest's 2 do not include ('heron', 'ibis', 'jay', ...)" in err
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before

    write_imagefolder(tmp_path / "known", {"finch": 2})  # a drop with some of the classes: finch keeps label 1
    assert cli.main(["shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "known"),
                     "--out", str(out), "--append"]) == 0
    assert "train: 2 new samples (0 already there) appended, 6 samples" in capsys.readouterr().out
    manifest = read_manifest(str(out / "train"))
    assert manifest.version == 2 and manifest.appends[0]["options"] == {"root": str((tmp_path / "known").resolve())}
    assert sorted(labels_read_back(str(out / "train")).values()) == [0, 0, 1, 1, 1, 1]

    syn = str(tmp_path / "syn")
    build_shards("synthetic", syn, options={"num_classes": 3, "train_per_class": 1, "test_per_class": 1,
                                            "image_size": 24}, progress=False)
    err = one_line_error(capsys, "shards", "build", "--source", "synthetic", "--out", syn, "--append",
                         "--option", "num_classes=3", "--option", "train_per_class=1", "--option", "test_per_class=1",
                         "--option", "image_size=32", "--option", "drop=1")
    assert "syn/train: holds synthetic converted with image_size=24, not image_size=32" in err
    err = one_line_error(capsys, "shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "known"),
                         "--out", syn, "--append")
    assert "holds synthetic, not ImageFolder" in err
    err = one_line_error(capsys, "shards", "build", "--source", "synthetic", "--out", syn, "--append",
                         "--option", "drop=-1")
    assert "option drop=-1: expected an integer >= 0" in err


def test_append_onto_nothing_is_a_plain_build_and_onto_a_missing_split_an_error(tmp_path, capsys):
    built = build_shards(colour_drop(0, 5), str(tmp_path / "new"), progress=False, append=True)["train"]
    assert (built.added, built.manifest.version, built.manifest.appends) == (5, 1, [])

    out = tmp_path / "half"
    build_shards(open_source("synthetic", None, {"num_classes": 3, "train_per_class": 1, "image_size": 24}),
                 str(out), splits=["train"], progress=False)
    err = one_line_error(capsys, "shards", "build", "--source", "synthetic", "--out", str(out), "--append",
                         "--option", "num_classes=3", "--option", "train_per_class=1", "--option", "image_size=24")
    assert f"{out / 'test'}: no manifest.json to append to, while {out} has split(s) train" in err
    assert not (out / "test").exists()


def test_manifests_without_a_version_read_as_version_1_and_a_bad_version_is_named(tmp_path):
    build_shards(colour_drop(0, 3), str(tmp_path), progress=False)
    raw = json.loads((tmp_path / "train" / "manifest.json").read_text())
    older = {k: v for k, v in raw.items() if k not in ("version", "appends")}  # as builds before appends wrote it
    manifest = parse_manifest(json.dumps(older), "old.json")
    assert (manifest.version, manifest.appends, manifest.total) == (1, [], 3)
    with pytest.raises(ShardError, match=r"bad.json: field 'version' = '2'; expected an integer >= 1"):
        parse_manifest(json.dumps(raw | {"version": "2"}), "bad.json")
    with pytest.raises(ShardError, match=r"bad.json: field 'appends' = \{\}; expected a list"):
        parse_manifest(json.dumps(raw | {"appends": {}}), "bad.json")


def test_a_synthetic_drop_has_new_keys_and_images_and_the_same_classes():
    options = {"num_classes": 3, "train_per_class": 2, "test_per_class": 1, "image_size": 24}
    first, second = open_source("synthetic", None, options), open_source("synthetic", None, options | {"drop": 1})
    assert second.class_names == first.class_names and second.sizes == first.sizes == {"train": 6, "test": 3}
    old, new = list(first.splits["train"]()), list(second.splits["train"]())
    assert [s.key for s in new] == [f"syn-train-{i:06d}" for i in range(6, 12)]
    assert [s.label for s in new] == [i % 3 for i in range(6, 12)]
    assert all(a.image.tobytes() != b.image.tobytes() for a, b in zip(old, new))
    assert second.options == first.options | {"drop": 1}


def test_the_build_shows_one_progress_bar_per_split_without_cursor_jumps(tmp_path, capsys):
    left_open = tqdm(total=1, desc="a bar an earlier failure left open")  # as CI's long pytest process had
    try:
        capsys.readouterr()
        build_shards(colour_drop(0, 12), str(tmp_path), maxcount=4, progress=True)
        err = capsys.readouterr().err
    finally:
        left_open.close()
    assert "\x1b[A" not in err  # what a second bar at position 1 moves the cursor with, garbling logs
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("colours train: 100%") and "12/12" in final and "3 shards published" in final
