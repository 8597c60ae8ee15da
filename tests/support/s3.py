"""A real S3-compatible server for tests: moto's server mode (``moto_server`` from PyPI's
``moto[server]``) as a separate process on a free port of 127.0.0.1, with a bucket created
through pyarrow's own S3 client. Without ``moto_server`` the tests skip, except under CI
(``CI`` set), where they fail: there the server is part of what is tested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudstream.broker import free_port
from fraudstream.testing import end_process

__all__ = ["S3_ENV", "s3_server"]

#: Credentials and region moto accepts (any value will do); the endpoint is added per server.
S3_ENV = {"AWS_ACCESS_KEY_ID": "fraudstream-test", "AWS_SECRET_ACCESS_KEY": "fraudstream-test",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(log_path: Path, bucket: str = "fraudstream") -> Iterator[dict[str, str]]:
    """Start moto's server, create ``bucket``; yields the AWS_* environment that points at it."""
    binary = shutil.which("moto_server")
    if binary is None:
        message = "moto_server not installed (pip install 'moto[server]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        from pyarrow import fs as pafs

        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"],
                          allow_bucket_creation=True, access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                          secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                          region=S3_ENV["AWS_DEFAULT_REGION"]).create_dir(bucket)
        yield env
    finally:
        end_process(process)
