"""A real S3-compatible server on loopback (moto's server mode) for storage tests.

The server speaks the S3 HTTP API on 127.0.0.1; pyarrow talks to it exactly as
to AWS, through ``AWS_ENDPOINT_URL`` or ``DISTMAML_S3_ENDPOINT``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from distmaml.machine.environ import environ


@contextmanager
def s3_server(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[str]:
    """Starts moto on a free loopback port, sets the AWS environment, yields ``http://127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with environ(aws):
            admin = pafs.S3FileSystem(
                endpoint_override=f"{host}:{port}",
                scheme="http",
                access_key="testing",
                secret_key="testing",
                region="us-east-1",
                allow_bucket_creation=True,
            )
            for bucket in buckets:
                admin.create_dir(bucket)
            yield endpoint
    finally:
        server.stop()
