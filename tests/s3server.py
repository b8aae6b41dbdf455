"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (``pip install -e '.[test]'``).

Use it from a test module by importing the fixtures (pytest finds fixtures imported into a
module)::

    from s3server import s3, s3_server  # noqa: F401

    def test_something(s3):
        run_dir = s3.root + "/run"        # s3://tltune-test/<unique per test>/run
        ...                                # AWS_* env points at the server during the test

``s3_server`` (session) starts the server and creates the bucket; ``s3`` (per test) sets the
standard AWS environment variables to reach it (``AWS_ENDPOINT_URL`` and test credentials,
with ``monkeypatch``, so they are undone after the test) and gives a fresh prefix. Processes
started during the test (a local Ray) inherit that environment. Nothing leaves 127.0.0.1: the
EC2 metadata service is disabled and ``~/.aws`` files are hidden.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

BUCKET = "tltune-test"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def open_loopback(url: "str | urllib.request.Request", timeout: float):
    """``urlopen`` that never goes through a proxy: urlopen's shared opener keeps the proxies of
    the environment it was first used in (a test that set http_proxy poisoned later tests)."""
    return _NO_PROXY.open(url, timeout=timeout)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    def env(self) -> dict[str, str]:
        """The environment variables by which pyarrow (and Ray) reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"})
        open_loopback(request, timeout=10).close()

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (moto accepts the unsigned request while auth is off)."""
        open_loopback(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=10).close()

    @contextlib.contextmanager
    def require_auth(self) -> Iterator[tuple[str, str]]:
        """Within: the server checks signatures and IAM policies (moto's auth mode). Yields
        the (access key id, secret) of an IAM user allowed everything on S3; any other key is
        rejected."""
        import boto3  # a dependency of moto

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        user = f"tltune-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._post("/moto-api/reset-auth", b"inf")


@dataclass
class S3Env:
    server: S3Server
    root: str  # s3://bucket/<unique prefix of this test>

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def bucket(self) -> str:
        return self.server.bucket


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1, with bucket ``tltune-test``; stopped at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test]'")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120  # idle, it answers within 2 s
        while True:
            try:
                open_loopback(endpoint + "/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        server = S3Server(endpoint=endpoint, bucket=BUCKET)
        server.create_bucket(BUCKET)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch, tmp_path) -> S3Env:
    """The AWS environment variables point at ``s3_server`` for this test; a fresh prefix in its bucket."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return S3Env(server=s3_server, root=f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}")
