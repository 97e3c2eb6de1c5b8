"""A published tree in S3 (``s3://bucket/prefix``) as a source: the HTTP source with SigV4 requests.

boto3/botocore are the optional extra ``hsmfs[s3]``. Fetches go through hsmfs's own transport
(hsmfs.sources.http: the same pool, range GETs, retries, integrity checks and network namespace
as an HTTP origin); botocore only finds the credentials, through its standard chain (environment,
``~/.aws``, SSO, container and instance roles: refreshed when they expire), and signs each request
(Signature Version 4). Credentials are never logged; a missing set is refused at mount time
(exit 77). The endpoint is AWS's for the region (``AWS_REGION``/``AWS_DEFAULT_REGION`` or the
profile's, else us-east-1) or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (path-style requests
then: MinIO, Ceph, moto). TLS is verified as for HTTP.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from hsmfs.errors import HsmfsError, NotPermitted, UsageError


class CredentialsMissing(NotPermitted):
    """No AWS credentials were found for an s3:// source (exit 77, EX_NOPERM)."""


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of s3://bucket/prefix."""
    p = urllib.parse.urlsplit(url)
    if p.scheme != "s3" or not p.netloc or p.query or p.fragment:
        raise UsageError(f"{url!r} is not an S3 URL of the form s3://bucket/prefix")
    return p.netloc, p.path.strip("/")


def _botocore() -> Any:
    try:
        import botocore.session
    except ImportError:
        raise HsmfsError("s3:// sources need botocore: pip install 'hsmfs[s3]'") from None
    return botocore.session.get_session()


def endpoint(session: Any, bucket: str) -> tuple[str, str]:
    """(base URL of the bucket, ending in "/"; region)."""
    region = session.get_config_variable("region") or os.environ.get("AWS_REGION") or "us-east-1"
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if custom:
        return f"{custom.rstrip('/')}/{bucket}/", region
    return f"https://{bucket}.s3.{region}.amazonaws.com/", region


class S3Signer:
    """Signs requests with the credentials of botocore's standard chain (refreshed when they expire)."""

    def __init__(self) -> None:
        self.session = _botocore()
        creds = self.session.get_credentials()
        if creds is None:
            raise CredentialsMissing(
                "no AWS credentials found for the s3:// source",
                hint="set them the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, "
                "or an instance or container role); hsmfs never logs them")
        self.creds = creds

    def __call__(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        region = self.region
        req = AWSRequest(method=method, url=url, headers=dict(headers))
        S3SigV4Auth(self.creds.get_frozen_credentials(), "s3", region).add_auth(req)
        return {k: v for k, v in req.headers.items() if k not in headers}

    region = "us-east-1"


def s3_manifest_url(url: str) -> tuple[str, S3Signer]:
    """The HTTP(S) URL of the manifest of s3://bucket/prefix, and a signer for its requests."""
    bucket, prefix = split_s3(url)
    signer = S3Signer()
    base, region = endpoint(signer.session, bucket)
    signer.region = region
    key = f"{prefix}/manifest" if prefix else "manifest"
    return base + urllib.parse.quote(key), signer


def s3_client() -> Any:
    """A boto3 S3 client (hsmfs publish), from the standard chain; CredentialsMissing without credentials."""
    try:
        import boto3
    except ImportError:
        raise HsmfsError("publishing to s3:// needs boto3: pip install 'hsmfs[s3]'") from None
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise CredentialsMissing("no AWS credentials found for the s3:// destination",
                                 hint="set them the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                                 "or a role)")
    return session.client("s3")
