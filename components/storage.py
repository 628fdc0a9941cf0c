"""Where shards, manifests and weights live: a local folder or `s3://bucket/prefix` (DESIGN §3).

S3 is reached through boto3 with the standard AWS variables (`AWS_ENDPOINT_URL` for an S3-compatible
store, `AWS_ACCESS_KEY_ID`, ...). boto3 clients are not fork-safe, so each process makes its own.
Importing this module registers an `s3://` opener with webdataset's `gopen`, so every webdataset
reader (and `components.data`) can stream shards straight from the bucket.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import boto3
import botocore.config
import botocore.exceptions
import webdataset as wds
from boto3.s3.transfer import TransferConfig

from lcr_core.errors import LCRError

S3_SCHEME = "s3://"
DEFAULT_PART_SIZE = 16 * 1024 * 1024
SHA256_METADATA = "sha256"  # user metadata on every uploaded object: what `put_file` compares to skip
HASH_BLOCK = 1024 * 1024
MISSING_CODES = ("NoSuchKey", "404", "NotFound")

# Errors a half-read S3 body can raise (besides OSError), for readers that must name the object.
STREAM_ERRORS = (botocore.exceptions.BotoCoreError,)


class StorageError(LCRError):
    """A missing bucket, key, file or credential; the message names the URI."""


class NotFound(StorageError):
    """No object or file at the URI (its bucket or folder may exist)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a folder or an s3:// prefix."""
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def name_of(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


_clients: dict[tuple, object] = {}
CLIENT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")


def s3_client():
    """This process's S3 client; `AWS_ENDPOINT_URL` (read by boto3 itself) selects a non-AWS store.
    A client keeps the endpoint and credentials it was made with, so a change of those variables
    (or a forked child) gets a new one."""
    identity = (os.getpid(), *(os.environ.get(name) for name in CLIENT_VARIABLES))
    if identity not in _clients:
        # Path-style addressing: S3-compatible stores behind an IP or a plain host name need it.
        style = "path" if os.environ.get("AWS_ENDPOINT_URL") else "auto"
        config = botocore.config.Config(s3={"addressing_style": style}, retries={"mode": "standard"})
        _clients[identity] = boto3.session.Session().client("s3", config=config)
    return _clients[identity]


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")


def _missing_bucket(uri: str) -> str:
    return f"{uri}: bucket {split_s3(uri)[0]!r} does not exist at {_endpoint()}; expected an existing bucket"


@contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Translate boto3's exceptions into one-line StorageErrors naming `uri` and what was expected."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"{uri}: no AWS credentials found; expected AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or an AWS profile) in the environment") from None
    except botocore.exceptions.EndpointConnectionError:
        raise StorageError(f"{uri}: cannot reach the S3 endpoint {_endpoint()}; expected a running "
                           "S3-compatible server (check AWS_ENDPOINT_URL)") from None
    except botocore.exceptions.ClientError as err:
        code = _error_code(err)
        if code == "NoSuchBucket":
            raise StorageError(_missing_bucket(uri)) from None
        if code in MISSING_CODES:
            raise NotFound(f"{uri}: no such object; expected it to exist") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{uri}: access denied ({code}); expected credentials allowed to use "
                               f"bucket {split_s3(uri)[0]!r}") from None
        raise StorageError(f"{uri}: S3 request failed ({code or err})") from None


def open_read(uri: str) -> BinaryIO:
    """A readable binary stream; for S3 the object body, streamed rather than downloaded first."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file; expected it to exist") from None


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    if mode != "rb":
        raise StorageError(f"{url}: webdataset writes to S3 are not supported; build shards with `lcr shards`")
    return open_read(url)


wds.gopen_schemes["s3"] = _gopen_s3


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object whole: a single PUT on S3, write-then-rename locally (never half a file)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def delete(uri: str) -> None:
    """Remove an object or file; absent is fine."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(uri).unlink(missing_ok=True)


def exists(uri: str) -> bool:
    if is_s3(uri):
        return _head(uri) is not None
    return Path(uri).is_file()


def _error_code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _head(uri: str) -> dict | None:
    """The object's headers, or None if there is no such key (a missing bucket is an error)."""
    bucket, key = split_s3(uri)
    with s3_errors(uri):
        try:
            return s3_client().head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as err:
            if _error_code(err) not in MISSING_CODES:
                raise
    _check_bucket(uri)  # a HEAD answer has no body: a 404 may also mean that the bucket is missing
    return None


def _check_bucket(uri: str) -> None:
    bucket = split_s3(uri)[0]
    with s3_errors(uri):
        try:
            s3_client().head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as err:
            if _error_code(err) in MISSING_CODES:
                raise StorageError(_missing_bucket(uri)) from None
            raise


def _listing(uri: str) -> tuple[list[str], list[str]]:
    """Names of the immediate sub-folders and files (common prefixes and objects on S3), each sorted."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix + "/" if prefix else ""
        folders, files = [], []
        with s3_errors(uri):
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                folders += [p["Prefix"][len(prefix):].strip("/") for p in page.get("CommonPrefixes", [])]
                files += [item["Key"][len(prefix):] for item in page.get("Contents", [])]
        return sorted(folders), sorted(files)
    path = Path(uri)
    if not path.is_dir():
        raise NotFound(f"{uri}: no such folder; expected it to exist")
    entries = list(path.iterdir())
    return sorted(p.name for p in entries if p.is_dir()), sorted(p.name for p in entries if p.is_file())


def list_dirs(uri: str) -> list[str]:
    return _listing(uri)[0]


def list_files(uri: str) -> list[str]:
    return _listing(uri)[1]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def stored_sha256(uri: str) -> str | None:
    """The sha256 of what is stored at `uri`, or None if nothing is. On S3 it is the checksum recorded
    at upload (objects put there by other tools have none and count as absent)."""
    if is_s3(uri):
        head = _head(uri)
        return None if head is None else head.get("Metadata", {}).get(SHA256_METADATA)
    return file_sha256(uri) if Path(uri).is_file() else None


def put_file(local: str | Path, uri: str, sha256: str, progress: Callable[[int], None] | None = None,
             part_size: int = DEFAULT_PART_SIZE) -> bool:
    """Move a finished local file to `uri` unless an identical one (same sha256) is already there.

    S3: a multipart upload (parts of `part_size` bytes) with the sha256 as object metadata; the object
    appears only when the upload completes, so an interruption never leaves a partial object.
    Local: an atomic rename. `progress(n)` is called with byte counts as they go. Returns True if the
    file was written, False if an identical copy was already there (the local file is then removed).
    """
    size = Path(local).stat().st_size
    if stored_sha256(uri) == sha256:
        Path(local).unlink()
        if progress:
            progress(size)
        return False
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
        with s3_errors(uri):
            s3_client().upload_file(str(local), bucket, key, Config=config, Callback=progress,
                                    ExtraArgs={"Metadata": {SHA256_METADATA: sha256}})
        Path(local).unlink()
        return True
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(local), uri)  # a rename when both are on one file system
    if progress:
        progress(size)
    return True


def download(uri: str, local: str | Path, part_size: int = DEFAULT_PART_SIZE) -> Path:
    """Copy one object or file to `local` (e.g. a weights file before `torch.load`)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        if _head(uri) is None:
            raise NotFound(f"{uri}: no such object; expected it to exist")
        bucket, key = split_s3(uri)
        config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
        with s3_errors(uri):
            s3_client().download_file(bucket, key, str(local), Config=config)
        return local
    if not Path(uri).is_file():
        raise NotFound(f"{uri}: no such file; expected it to exist")
    shutil.copyfile(uri, local)
    return local
