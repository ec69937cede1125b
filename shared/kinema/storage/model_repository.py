"""Copy a Triton model repository from S3 into a local folder.

Kinema's loaders read model repositories from local paths. A process that needs the repository Triton serves from a
bucket (the chart's job workers, which train distillation students against the teacher's weights) copies it first:

    python -m kinema.storage.model_repository s3://HOST[:PORT]/BUCKET[/PREFIX] DEST [--secure 1|0]

The first argument may also be Triton's own `--model-repository=s3://...` argument, so a deployment passes Triton's
value unchanged. Keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION), as Triton reads
them. Every object under the prefix lands at its path relative to the prefix; an empty prefix, or an object whose
name would leave DEST, is an error (exit status 1, one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from kinema.errors import InvalidInput, NotFound

TRITON_FLAG = "--model-repository="


def parse_uri(uri: str) -> tuple[str, str, str]:
    """(endpoint host:port, bucket, prefix ending in '/' or empty) of `s3://host[:port]/bucket[/prefix]`."""
    uri = uri.removeprefix(TRITON_FLAG)
    parts = urlsplit(uri)
    bucket, _, prefix = parts.path.lstrip("/").partition("/")
    if parts.scheme != "s3" or not parts.netloc or not bucket:
        raise InvalidInput(f"expected s3://HOST[:PORT]/BUCKET[/PREFIX], got {uri!r}", reason="INVALID_URI", field="uri")
    prefix = prefix.strip("/")
    return parts.netloc, bucket, prefix + "/" if prefix else ""


def local_path(dest: Path, name: str) -> Path:
    """Where object `name` (relative to the prefix) goes under `dest`; InvalidInput for a name that would leave it."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InvalidInput(f"object {name!r} would be written outside {dest}", reason="UNSAFE_NAME", field="uri")
    return dest.joinpath(*relative.parts)


def download(uri: str, dest: Path, *, access_key: str, secret_key: str, secure: bool, region: str | None = None,
             http_client=None) -> int:  # fmt: skip
    """Copy every object under the URI's prefix into `dest`; the number of files. NotFound when there are none."""
    from minio import Minio

    endpoint, bucket, prefix = parse_uri(uri)
    client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region or None,
                   http_client=http_client)  # fmt: skip
    copied = 0
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        if obj.is_dir:
            continue
        path = local_path(dest, obj.object_name[len(prefix) :])
        client.fget_object(bucket, obj.object_name, str(path))
        copied += 1
    if not copied:
        raise NotFound(f"no model repository at {uri.removeprefix(TRITON_FLAG)}: nothing under that prefix",
                       reason="EMPTY_REPOSITORY", field="uri")  # fmt: skip
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("uri", help="s3://HOST[:PORT]/BUCKET[/PREFIX], or Triton's --model-repository=s3://... argument")
    ap.add_argument("dest", type=Path, help="the local folder to copy the repository into")
    ap.add_argument("--secure", choices=("1", "0"), default="1", help="HTTPS (1, the default) or plain HTTP (0)")
    # Triton's `--model-repository=s3://...` as it is: a positional argument here, not an option
    args = ap.parse_args([a.removeprefix(TRITON_FLAG) for a in (sys.argv[1:] if argv is None else argv)])
    import urllib3
    from minio.error import S3Error

    try:
        n = download(args.uri, args.dest, access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                     secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""), secure=args.secure == "1",
                     region=os.environ.get("AWS_DEFAULT_REGION"))  # fmt: skip
    except (InvalidInput, NotFound, S3Error, urllib3.exceptions.HTTPError, OSError) as e:
        print(f"kinema.storage.model_repository: {args.uri}: {e}", file=sys.stderr)
        return 1
    print(f"copied {n} files of {args.uri.removeprefix(TRITON_FLAG)} to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
