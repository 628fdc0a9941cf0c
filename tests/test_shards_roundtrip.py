"""Local shards: written once, read back exactly once per epoch over ranks x workers, bad input caught."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from components import cli, shards
from components.data import ShardError, epoch_order, eval_loader, read_manifest, steps_per_epoch, train_loader
from components.shards import build_shards, verify_shards
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError
from tests.shard_samples import colour_source, identity_views, interrupted, key_of


def config(shards: Path, batch_size: int, world: int, workers: int = 2) -> LCRConfig:
    return LCRConfig(shards=str(shards), batch_size=batch_size, num_workers=world, queue_size=batch_size,
                     loader_workers=workers, image_size=16, eval_resize=16, seed=3).validate()


def epoch_indices(cfg: LCRConfig, epoch: int, world: int) -> list[list[list[int]]]:
    """Per rank, the batches of sample indices one epoch yields."""
    ranks = []
    for rank in range(world):
        loader = train_loader(cfg, epoch, rank=rank, world_size=world, transform=identity_views)
        ranks.append([q.tolist() for q, k in loader])
        assert loader.skipped == 0
    return ranks


@pytest.mark.parametrize("total, maxcount", [(48, 5), (50, 7), (37, 4)])
def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(tmp_path, total, maxcount):
    built = build_shards(colour_source({"train": total}), str(tmp_path), maxcount=maxcount, progress=False)
    manifest = built["train"].manifest
    assert manifest.total == total and len(manifest.shards) == -(-total // maxcount)  # uneven: not a multiple of 4
    cfg = config(tmp_path, batch_size=6, world=2)
    steps = steps_per_epoch(manifest, cfg)
    assert steps == total // 6

    seen_per_epoch = []
    for epoch in (0, 1):
        ranks = epoch_indices(cfg, epoch, world=2)
        assert [len(batches) for batches in ranks] == [steps, steps]  # equal batch counts: no DDP hang
        assert all(len(batch) == 3 for batches in ranks for batch in batches)
        seen = [i for batches in ranks for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == steps * 6  # nothing twice; only the remainder dropped
        assert set(seen) <= set(range(total))
        seen_per_epoch.append(seen)
    assert seen_per_epoch[0] != seen_per_epoch[1]  # the epoch reorders the shards


@pytest.mark.parametrize("workers, start_step", [(2, 3), (2, 4), (0, 5)])
def test_resuming_mid_epoch_gives_the_remaining_batches(tmp_path, workers, start_step):
    build_shards(colour_source({"train": 40}), str(tmp_path), maxcount=6, progress=False)
    cfg = config(tmp_path, batch_size=8, world=2, workers=workers)
    whole = [q.tolist() for q, _ in train_loader(cfg, 1, rank=1, world_size=2, transform=identity_views)]
    resumed = train_loader(cfg, 1, rank=1, world_size=2, transform=identity_views, start_step=start_step)
    assert len(resumed) == 5 - start_step
    assert [q.tolist() for q, _ in resumed] == whole[start_step:]
    with pytest.raises(LCRError, match="start_step 6: expected 0..5"):
        train_loader(cfg, 1, rank=1, world_size=2, start_step=6)


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, seed=1, epoch=4)) == list(range(10))
    assert epoch_order(10, 1, 4) == epoch_order(10, 1, 4)  # every rank computes the same
    assert epoch_order(10, 1, 4) != epoch_order(10, 1, 5)


def test_rank_comes_from_the_environment(tmp_path, monkeypatch):
    build_shards(colour_source({"train": 24}), str(tmp_path), maxcount=5, progress=False)
    cfg = config(tmp_path, batch_size=4, world=2, workers=0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = [q.tolist() for q, _ in train_loader(cfg, 0, transform=identity_views)]
    explicit = [q.tolist() for q, _ in train_loader(cfg, 0, rank=1, world_size=2, transform=identity_views)]
    assert from_env == explicit and len(from_env) == 6
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LCRError, match="world size 3 but config num_workers = 2"):
        train_loader(cfg, 0)


def test_training_batches_are_two_augmented_views(tmp_path):
    build_shards(colour_source({"train": 8}), str(tmp_path), progress=False)
    cfg = config(tmp_path, batch_size=4, world=1, workers=0)
    batches = list(train_loader(cfg, 0))
    assert len(batches) == 2
    im_q, im_k = batches[0]
    assert im_q.shape == im_k.shape == (4, 3, 16, 16) and im_q.dtype == torch.float32


def test_eval_loader_reads_every_sample_once_with_keys_and_labels(tmp_path):
    build_shards(colour_source({"test": 23}), str(tmp_path), maxcount=4, progress=False)
    loader = eval_loader(str(tmp_path / "test"), image_size=16, resize=20, batch_size=5, workers=2)
    keys, labels = [], []
    for images, batch_labels, batch_keys in loader:
        assert images.shape[1:] == (3, 16, 16) and len(batch_keys) == len(batch_labels) == len(images)
        keys += batch_keys
        labels += batch_labels.tolist()
    assert Counter(keys) == Counter(key_of(i) for i in range(1000, 1023))
    assert dict(zip(keys, labels)) == {key_of(i): i % 3 for i in range(1000, 1023)}
    assert loader.skipped == 0


def test_undecodable_images_are_skipped_counted_and_reported(tmp_path, caplog, monkeypatch):
    bad = {3, 17}
    # shards written without the builder's full decode (an older builder, another tool, bit rot)
    monkeypatch.setattr(shards, "jpeg_bytes", lambda image: image)
    build_shards(colour_source({"train": 24, "test": 10}, bad=bad | {1004}), str(tmp_path), maxcount=5,
                 progress=False)
    cfg = config(tmp_path, batch_size=4, world=2)
    counts, seen, skipped = [], set(), 0
    with caplog.at_level(logging.WARNING, logger="lcr.data"):
        for rank in range(2):
            loader = train_loader(cfg, 0, rank=rank, world_size=2, transform=identity_views)
            batches = [q.tolist() for q, _ in loader]
            counts.append(len(batches))
            assert all(len(b) == 2 for b in batches)  # the skipped places were filled
            seen |= {i for b in batches for i in b}
            skipped += loader.skipped
    assert counts == [6, 6] and skipped == 2
    assert seen == set(range(24)) - bad
    assert re.search(r"train epoch 0 rank \d: skipped \d undecodable image\(s\) in .*train", caplog.text)

    loader = eval_loader(str(tmp_path / "test"), 16, 16, batch_size=4, workers=2)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert loader.skipped == 1 and sorted(keys) == [key_of(i) for i in range(1000, 1010) if i != 1004]


def test_images_that_are_no_images_are_left_out_at_build_and_counted(tmp_path):
    built = build_shards(colour_source({"train": 10}, unreadable={2, 5}), str(tmp_path), progress=False)
    manifest = read_manifest(str(tmp_path / "train"))
    assert built["train"].manifest == manifest
    assert manifest.total == 8 and manifest.unreadable == 2


def test_manifest_lists_shards_with_checksums(tmp_path):
    build_shards(colour_source({"train": 11}), str(tmp_path), maxcount=4, progress=False)
    raw = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert raw["dataset"] == "colours" and raw["split"] == "train" and raw["total"] == 11
    assert raw["class_names"] == ["class0", "class1", "class2"] and raw["tool_version"]
    assert [s["count"] for s in raw["shards"]] == [4, 4, 3]
    for entry in raw["shards"]:
        path = tmp_path / "train" / entry["name"]
        assert path.stat().st_size == entry["bytes"]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 3 * entry["count"]  # .jpg, .cls, .json per sample
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls", "json"}
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 11


@pytest.mark.parametrize("cut", [1800, 3000, 6000])  # inside a .jpg, a header, a later sample
def test_truncated_shard_stops_reading_and_fails_verification(tmp_path, cut):
    build_shards(colour_source({"train": 12}), str(tmp_path), maxcount=6, progress=False)
    shard = tmp_path / "train" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    cfg = config(tmp_path, batch_size=4, world=1)
    with pytest.raises(ShardError, match=r"train-000001.tar: truncated") as err:
        list(train_loader(cfg, 0, transform=identity_views))
    assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match=r"1 of 2 shards failed verification: train/train-000001.tar"):
        verify_shards(str(tmp_path), progress=False)


def test_shard_cut_at_a_sample_boundary_is_caught_by_the_manifest_count(tmp_path):
    build_shards(colour_source({"train": 12}), str(tmp_path), maxcount=6, progress=False)
    shard = tmp_path / "train" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # a well-formed tar holding one sample fewer
        for member, data in members[:-3]:
            tar.addfile(member, io.BytesIO(data))
    cfg = config(tmp_path, batch_size=12, world=1, workers=0)
    with pytest.raises(ShardError, match="train-000000.tar: truncated, ended after 5 of 6 samples"):
        list(train_loader(cfg, 0, transform=identity_views))
    with pytest.raises(ShardError, match="train-000000.tar has"):
        verify_shards(str(tmp_path / "train"), progress=False)


def test_checksum_mismatch_fails_verification(tmp_path):
    build_shards(colour_source({"train": 8}), str(tmp_path), maxcount=4, progress=False)
    shard = tmp_path / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first JPEG (members: header, .cls, header, .jpg): same size
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train/train-000001.tar sha256 \w+… != manifest \w+…"):
        verify_shards(str(tmp_path), progress=False)


def test_missing_malformed_and_empty_manifests(tmp_path):
    with pytest.raises(ShardError, match=r"nowhere/train: no manifest.json; expected a split built by"):
        read_manifest(str(tmp_path / "nowhere" / "train"))
    with pytest.raises(ShardError, match="no manifest.json in it or in its sub-folders"):
        verify_shards(str(tmp_path), progress=False)
    build_shards(colour_source({"train": 4}), str(tmp_path), progress=False)
    path = tmp_path / "train" / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        read_manifest(str(tmp_path / "train"))
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "class_names"}))
    with pytest.raises(ShardError, match="field 'class_names' missing"):
        read_manifest(str(tmp_path / "train"))
    path.write_text(json.dumps(raw | {"shards": [], "total": 0}))
    with pytest.raises(ShardError, match="the 'train' split is empty"):
        read_manifest(str(tmp_path / "train"))


def test_empty_source_split_and_too_small_split_are_errors(tmp_path):
    with pytest.raises(ShardError, match="colours split 'train': no readable samples"):
        build_shards(colour_source({"train": 0}), str(tmp_path), progress=False)
    assert not (tmp_path / "train" / "manifest.json").exists()
    build_shards(colour_source({"train": 5}), str(tmp_path), progress=False)
    with pytest.raises(ShardError, match="5 samples, fewer than one global batch of 6"):
        train_loader(config(tmp_path, batch_size=6, world=1), 0)


def test_interrupted_build_leaves_no_manifest_and_rerun_reuses_finished_shards(tmp_path):
    source = colour_source({"train": 20})
    build_shards(source, str(tmp_path), maxcount=4, progress=False)
    first = {p.name: p.read_bytes() for p in (tmp_path / "train").glob("*.tar")}

    with pytest.raises(KeyboardInterrupt):  # a rebuild dies while writing its fourth shard
        build_shards(interrupted(source, "train", after=14), str(tmp_path), maxcount=4, progress=False)
    split = tmp_path / "train"
    assert not (split / "manifest.json").exists()  # the old one went first: nothing points at a half build
    assert not list(split.glob(".staging-*")) and not list(split.glob("*.partial"))
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(str(split))

    rerun = build_shards(source, str(tmp_path), maxcount=4, progress=False)["train"]
    assert (rerun.written, rerun.reused) == (0, 5)  # byte-identical shards: nothing rewritten
    assert {p.name: p.read_bytes() for p in split.glob("*.tar")} == first
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 20


def test_cli_build_verify_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "syn"
    code = cli.main(["shards", "build", "--source", "synthetic", "--out", str(out), "--maxcount", "5",
                     "--option", "num_classes=3", "--option", "train_per_class=4",
                     "--option", "test_per_class=2", "--option", "image_size=24"])
    assert code == 0
    assert "train: 12 samples, 3 shards (3 written, 0 already there)" in capsys.readouterr().out
    manifest = read_manifest(str(out / "train"))
    assert manifest.dataset == "synthetic" and manifest.options["num_classes"] == 3
    assert cli.main(["shards", "verify", str(out)]) == 0
    assert "test: 2 shards, 6 samples: OK" in capsys.readouterr().out

    assert cli.main(["shards", "verify", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcr shards: error: ") and err.count("\n") == 1
    assert cli.main(["shards", "build", "--source", "cub", "--root", str(tmp_path), "--out", str(out)]) == 2
    assert "images.txt is missing" in capsys.readouterr().err
    assert cli.main(["shards", "build", "--source", "synthetic", "--out", str(out), "--option", "colour=1"]) == 2
    assert "option 'colour': expected SyntheticSpec fields" in capsys.readouterr().err


def test_a_smaller_rebuild_removes_only_the_shards_it_no_longer_names(tmp_path):
    split = tmp_path / "train"
    build_shards(colour_source({"train": 12}), str(tmp_path), maxcount=3, progress=False)
    assert sorted(p.name for p in split.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(4)]
    (split / "notes.txt").write_text("mine")
    (split / "train-old.tar").write_bytes(b"not ours to judge")
    rebuilt = build_shards(colour_source({"train": 12}), str(tmp_path), maxcount=6, progress=False)["train"]
    assert [e.name for e in rebuilt.manifest.shards] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in split.iterdir()) == [
        "manifest.json", "notes.txt", "train-000000.tar", "train-000001.tar", "train-old.tar"]
    assert verify_shards(str(tmp_path), progress=False)["train"].total == 12
