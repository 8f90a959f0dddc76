"""boto3 clients built from Settings, and the translation of botocore errors into the project's tree.

Each adapter (sqs, fetch, results) passes its own table of AWS error codes; transport failures are
always retryable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.utils import determine_content_length

from consumer.errors import ConsumerError, PermanentError, RetryableError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings

# Long polls hold a connection for up to 20 s, so the read timeout must exceed WaitTimeSeconds.
# botocore's own "standard" retries cover throttling and 5xx with backoff; SQS redelivery covers the rest.
BOTO_CONFIG = Config(
    connect_timeout=5,
    read_timeout=30,
    retries={"mode": "standard", "max_attempts": 3},
    max_pool_connections=64,
)

# Heartbeats must land or fail quickly: the worker waits for one on the wire before it changes the same
# message's visibility (worker.HEARTBEAT_WAIT), and one landing later would undo that change. A failed
# heartbeat is tried again a few seconds later (housekeeping.HEARTBEAT_RETRY), well inside the timeout.
HEARTBEAT_CONFIG = Config(
    connect_timeout=3,
    read_timeout=5,
    retries={"mode": "standard", "total_max_attempts": 1},  # no retry: the next heartbeat is the retry
    max_pool_connections=4,
)

# Codes that mean "the same call may work later" for every service.
TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestThrottled", "SlowDown", "ServiceUnavailable",
    "InternalError", "InternalFailure", "RequestTimeout", "RequestTimeoutException",
    "AWS.SimpleQueueService.ServiceUnavailable", "KMS.ThrottlingException",
})


def _session_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"region_name": settings.aws_region}
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        kwargs["aws_access_key_id"] = settings.aws_access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.aws_secret_access_key.get_secret_value()
        if settings.aws_session_token:
            kwargs["aws_session_token"] = settings.aws_session_token.get_secret_value()
    return kwargs


def make_clients(settings: Settings) -> tuple[SQSClient, S3Client]:
    """SQS and S3 clients for the configured region and endpoint (a local stack when set)."""
    session = boto3.session.Session(**_session_kwargs(settings))
    endpoint = settings.aws_endpoint_url
    sqs = session.client("sqs", endpoint_url=endpoint, config=BOTO_CONFIG)
    s3 = session.client("s3", endpoint_url=endpoint, config=BOTO_CONFIG)
    s3.meta.events.register_last("before-call.s3", _send_small_bodies_at_once)  # after add_expect_header
    return sqs, s3


# botocore asks for `Expect: 100-continue` on every PutObject with a body (handlers.add_expect_header), and
# then waits for the server's interim 100 before it sends a byte of the body (awsrequest.AWSConnection
# ._send_output): one more round trip per job-record write, two of them before the callback. The
# handshake only pays when a body is big enough that sending it to a refusal costs more than the round
# trip (RFC 9110 section 10.1.1); a job record is a few kilobytes.
EXPECT_MIN_BYTES = 1024 * 1024


def _send_small_bodies_at_once(params: dict[str, Any], **_: Any) -> None:
    body = params.get("body")
    size = determine_content_length(body) if body is not None else None  # botocore's own measure; None: unknown
    if size is not None and size < EXPECT_MIN_BYTES:
        params["headers"].pop("Expect", None)


def make_heartbeat_client(settings: Settings) -> SQSClient:
    """An SQS client for visibility heartbeats only, with HEARTBEAT_CONFIG's short timeouts."""
    session = boto3.session.Session(**_session_kwargs(settings))
    return session.client("sqs", endpoint_url=settings.aws_endpoint_url, config=HEARTBEAT_CONFIG)


def aws_error_code(exc: Exception) -> str | None:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


def translate_aws_error(
    exc: Exception, table: dict[str, tuple[bool, str]], *, default_code: str, what: str
) -> ConsumerError:
    """Map a botocore exception to Retryable/PermanentError: by `table`, then transport, then default."""
    code = aws_error_code(exc)
    if code in table:
        retryable, our_code = table[code]
    elif code in TRANSIENT_CODES or isinstance(exc, (EndpointConnectionError, BotoCoreError)):
        retryable, our_code = True, default_code
    elif isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        retryable, our_code = status >= 500 or status == 429, default_code
    else:
        retryable, our_code = True, default_code
    message = f"{what}: {code or type(exc).__name__}: {exc}"
    return RetryableError(message, code=our_code) if retryable else PermanentError(message, code=our_code)


# Where boto3's default credential chain looks, in its order (boto3 "Credentials" guide).
CREDENTIALS_HINT = ("boto3 looks for AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (environment, .env or --env-file), "
                    "then AWS_PROFILE and ~/.aws/credentials / ~/.aws/config, then the instance role")


def explain_aws_error(exc: BaseException) -> str | None:
    """One line for an operator about the botocore error behind `exc` (itself or a cause), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (NoCredentialsError, PartialCredentialsError)):
            return f"no usable AWS credentials ({seen}): {CREDENTIALS_HINT}"
        if isinstance(seen, EndpointConnectionError):
            return (f"cannot reach {seen.kwargs.get('endpoint_url', 'the AWS endpoint')}: check AWS_ENDPOINT_URL "
                    "(a local stack: is `make run` still running?) and AWS_REGION")
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            what = f"{seen.operation_name}: {error.get('Code', '?')}: {error.get('Message', '')}"
            if error.get("Code") in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
                return (f"{what} (the credentials in use lack this permission; deploy/cloudformation.yaml "
                        "has the policies)")
            return what
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None
