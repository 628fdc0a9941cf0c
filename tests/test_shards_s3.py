"""Shards in object storage, against a real S3-protocol server (moto's server mode, a subprocess)."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest
import webdataset as wds

from components import storage
from components.data import ShardError, eval_loader, read_manifest, train_loader
from components.shards import build_shards, verify_shards
from lcr_core.config import LCRConfig
from tests.shard_samples import colour_source, identity_views, interrupted, key_of

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server)


def test_build_verify_and_stream_from_a_bucket(s3_bucket, s3):
    dest = f"s3://{s3_bucket}/sets/colours"
    built = build_shards(colour_source({"train": 30, "test": 9}), dest, maxcount=7, progress=False)
    assert (built["train"].written, built["train"].reused) == (5, 0)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "sets/colours/train/manifest.json" in keys and "sets/colours/train/train-000004.tar" in keys
    head = s3.head_object(Bucket=s3_bucket, Key="sets/colours/train/train-000000.tar")
    assert head["Metadata"]["sha256"] == built["train"].manifest.shards[0].sha256

    assert set(verify_shards(dest, progress=False)) == {"train", "test"}

    cfg = LCRConfig(shards=dest, batch_size=4, num_workers=2, queue_size=4, loader_workers=2, image_size=16,
                    eval_resize=16).validate()
    seen = []
    for rank in range(2):
        batches = [q.tolist() for q, _ in train_loader(cfg, 0, rank=rank, world_size=2, transform=identity_views)]
        assert len(batches) == 7  # 30 // 4 on every rank
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 28

    loader = eval_loader(f"{dest}/test", 16, 16, batch_size=4, workers=2)
    assert sorted(k for _, _, ks in loader for k in ks) == [key_of(i) for i in range(1000, 1009)]

    # the opener registered with webdataset serves any webdataset pipeline, too
    urls = read_manifest(f"{dest}/test").shard_uris(f"{dest}/test")
    plain = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
    assert sorted(sample["__key__"] for sample in plain) == [key_of(i) for i in range(1000, 1009)]


def test_interrupted_upload_then_rerun_loses_nothing(s3_bucket, s3):
    dest = f"s3://{s3_bucket}/colours"
    source = colour_source({"train": 20})
    with pytest.raises(KeyboardInterrupt):
        build_shards(interrupted(source, "train", after=13), dest, maxcount=4, progress=False)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="colours/train/")["Contents"]
    uploaded = {o["Key"]: o["ETag"] for o in listed}
    assert sorted(uploaded) == [f"colours/train/train-00000{i}.tar" for i in range(3)]  # whole shards only
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(f"{dest}/train")

    rerun = build_shards(source, dest, maxcount=4, progress=False)["train"]
    assert (rerun.written, rerun.reused) == (2, 3)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="colours/train/")["Contents"]
    assert {o["Key"]: o["ETag"] for o in listed if o["Key"] in uploaded} == uploaded
    assert verify_shards(dest, progress=False)["train"].total == 20


def test_a_smaller_rebuild_in_the_bucket_leaves_no_stale_shards(s3_bucket, s3):
    dest = f"s3://{s3_bucket}/resized"
    build_shards(colour_source({"train": 12}), dest, maxcount=3, progress=False)
    build_shards(colour_source({"train": 12}), dest, maxcount=6, progress=False)
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="resized/train/")["Contents"])
    assert listed == ["resized/train/manifest.json", "resized/train/train-000000.tar", "resized/train/train-000001.tar"]


def test_checksum_mismatch_in_the_bucket(s3_bucket, s3):
    dest = f"s3://{s3_bucket}/colours"
    build_shards(colour_source({"train": 8}), dest, maxcount=4, progress=False)
    key = "colours/train/train-000001.tar"
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[2000] ^= 0xFF
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with pytest.raises(ShardError, match=r"1 of 2 shards failed verification: train/train-000001.tar sha256"):
        verify_shards(dest, progress=False)
    s3.delete_object(Bucket=s3_bucket, Key=key)
    with pytest.raises(ShardError, match="train/train-000001.tar missing"):
        verify_shards(dest, progress=False)


def test_multipart_upload_skip_and_download(s3_bucket, s3, tmp_path):
    payload = os.urandom(11 * 1024 * 1024)
    local = tmp_path / "weights.bin"
    local.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    uri = f"s3://{s3_bucket}/models/weights.bin"
    assert not storage.exists(uri)
    assert storage.put_file(local, uri, sha, part_size=5 * 1024 * 1024) is True
    assert s3.head_object(Bucket=s3_bucket, Key="models/weights.bin")["ETag"].endswith('-3"')  # 3 parts
    assert storage.exists(uri) and storage.stored_sha256(uri) == sha

    local.write_bytes(payload)
    assert storage.put_file(local, uri, sha) is False  # already there: not uploaded again
    assert storage.download(uri, tmp_path / "copy.bin").read_bytes() == payload


def test_missing_bucket_key_and_credentials(s3_server, s3_bucket, tmp_path, monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        build_shards(colour_source({"train": 4}), "s3://no-such-bucket/x", progress=False)
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        read_manifest("s3://no-such-bucket/x/train")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.download("s3://no-such-bucket/w.pt", tmp_path / "w.pt")
    with pytest.raises(storage.NotFound, match=f"s3://{s3_bucket}/w.pt: no such object"):
        storage.download(f"s3://{s3_bucket}/w.pt", tmp_path / "w.pt")
    with pytest.raises(ShardError, match="no manifest.json in it or in its sub-folders"):
        verify_shards(f"s3://{s3_bucket}/nothing", progress=False)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata address off this host
    with pytest.raises(storage.StorageError, match=f"s3://{s3_bucket}/x/train/manifest.json: no AWS credentials"):
        read_manifest(f"s3://{s3_bucket}/x/train")
