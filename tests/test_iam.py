"""IAM verified, not assumed: the daemon and every CLI command run under moto's IAM enforcement, with
credentials that hold only what deploy/cloudformation.yaml grants (the sidecar's policy; WordPress's for
publishing), read from the stack the template creates.

moto checks each request against the caller's policies once INITIAL_NO_AUTH_ACTION_COUNT requests have
been served: `moto.settings` reads it from the environment at import (default: never), and
`POST /moto-api/reset-auth` sets it in a running server and restarts the count. Both are process-wide, so
this module runs a moto server of its own in a subprocess: the stack, users and keys are made unchecked,
then checking starts (count 0) and lasts for the server's life; every later call needs IAM credentials.

Where moto checks a request differently from AWS, `moto_aliases` grants in moto's terms what AWS grants
with the very same policy, derived statement by statement from the template's policy (nothing else is
added; test_moto_checks_differ_from_aws_where_aliases_say_so proves each difference still exists):
  - SQS batch calls: AWS authorizes SendMessageBatch, DeleteMessageBatch and ChangeMessageVisibilityBatch
    by the single action's permission (SQS developer guide, "Amazon SQS batch actions": they cannot be
    granted on their own); moto checks sqs:<BatchAction>.
  - HeadBucket: AWS needs s3:ListBucket (S3 API reference, HeadBucket); moto checks s3:HeadBucket.
  - GetQueueUrl: moto cannot tell the queue from a QueueName and checks it against the resource "*", so a
    grant on the queue's ARN is rendered as a grant on "*", for that one action.
moto evaluates no resource policies (the template's TLS-only QueuePolicy is not even created) and no
condition keys (REALITY.md, "IAM as moto checks it").
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from consumer.dlq import LIST_VISIBILITY, list_dead_letters
from consumer.sqs import SqsQueue
from tests.conftest import SPEECH, DaemonProcess, send_job
from tests.stack import wait_for
from tests.stack.aws import REGION, AwsStack, MotoServer

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "cloudformation.yaml"
ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
MOTO_ACTION_ALIASES = {
    "sqs:SendMessage": "sqs:SendMessageBatch",
    "sqs:DeleteMessage": "sqs:DeleteMessageBatch",
    "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch",
    "s3:ListBucket": "s3:HeadBucket",
}
STACK_SETTINGS = {"S3_KEY_PREFIX": "audio/", "RESULTS_PREFIX": "transcripts/", "SQS_DLQ_URL": ""}
LAUNCH = """
import threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Event().wait()
"""

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@dataclasses.dataclass(frozen=True)
class Keys:
    id: str
    secret: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.id, "AWS_SECRET_ACCESS_KEY": self.secret}


class EnforcingMotoServer(MotoServer):
    """A moto server in a subprocess of its own that, after `enforce()`, checks IAM on every request."""

    def __init__(self, log_path: Path) -> None:  # not super().__init__: that starts an in-process server
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH], stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"moto server did not start:\n{log_path.read_text()[-2000:]}"
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        self.keys = Keys("testing", "testing")  # any key passes until enforce()

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(aws_access_key_id=self.keys.id, aws_secret_access_key=self.keys.secret,
                                     region_name=REGION)

    def client_as(self, keys: Keys, service: str) -> Any:
        session = boto3.session.Session(aws_access_key_id=keys.id, aws_secret_access_key=keys.secret,
                                        region_name=REGION)
        return session.client(service, endpoint_url=self.endpoint)  # type: ignore[call-overload]

    def principal(self, name: str, *, managed: tuple[str, ...] = (), inline: tuple[dict[str, Any], ...] = ()) -> Keys:
        """An IAM user with exactly these policies, and an access key of it."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        for arn in managed:
            iam.attach_user_policy(UserName=name, PolicyArn=arn)
        for n, document in enumerate(inline):
            iam.put_user_policy(UserName=name, PolicyName=f"inline-{n}", PolicyDocument=json.dumps(document))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Keys(key["AccessKeyId"], key["SecretAccessKey"])

    def enforce(self) -> None:
        """Make an administrator for the tests' own setup and checks, then check every request."""
        self.keys = self.principal("test-administrator", inline=(ADMIN,))
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.load(reply)["status"] == "ok"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclasses.dataclass
class TemplateStack:
    """A stack of the template, and keys of principals that hold only its policies."""

    server: EnforcingMotoServer
    aws: AwsStack  # the stack's queues and bucket, with administrator clients for setup and checks
    outputs: dict[str, str]
    documents: dict[str, dict[str, Any]]  # policy documents as the stack created them, by output name
    sidecar: Keys
    wordpress: Keys


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def moto_aliases(document: dict[str, Any]) -> dict[str, Any] | None:
    """What `document` grants on AWS but moto checks under other names (see the module docstring)."""
    statements = []
    for st in document["Statement"]:
        # The translation holds for plain Allow statements; anything else would need more thought here.
        assert st["Effect"] == "Allow" and "Condition" not in st and "NotAction" not in st, st
        actions = as_list(st["Action"])
        aliases = [MOTO_ACTION_ALIASES[a] for a in actions if a in MOTO_ACTION_ALIASES]
        if aliases:
            statements.append({"Effect": "Allow", "Action": aliases, "Resource": st["Resource"]})
        if "sqs:GetQueueUrl" in actions:
            statements.append({"Effect": "Allow", "Action": "sqs:GetQueueUrl", "Resource": "*"})
    return {"Version": "2012-10-17", "Statement": statements} if statements else None


def holding(server: EnforcingMotoServer, name: str, document: dict[str, Any], *, managed: str | None = None) -> Keys:
    """A principal holding `document` (attached as the stack's managed policy when its ARN is given), plus
    its moto aliases."""
    aliases = moto_aliases(document)
    inline = (() if managed else (document,)) + ((aliases,) if aliases else ())
    return server.principal(name, managed=(managed,) if managed else (), inline=inline)


def policy_document(server: EnforcingMotoServer, arn: str) -> dict[str, Any]:
    iam = server.client("iam")
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]
    return json.loads(document) if isinstance(document, str) else dict(document)


@pytest.fixture(scope="module")
def iam_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnforcingMotoServer]:
    server = EnforcingMotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.enforce()
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(iam_moto: EnforcingMotoServer) -> TemplateStack:
    """A fresh stack of the template (unique names), created by the administrator."""
    tag = uuid.uuid4().hex[:8]
    bucket = f"recordings-{tag}"
    iam_moto.client("s3").create_bucket(Bucket=bucket)
    cfn = iam_moto.client("cloudformation")
    params = {"BucketName": bucket, "NamePrefix": f"iam-{tag}", "Environment": "prod", "VisibilityTimeout": "30",
              "AudioPrefix": "audio/", "ResultsPrefix": "transcripts/"}
    with warnings.catch_warnings():
        # moto does not model AWS::SQS::QueuePolicy (the TLS-only deny); it skips it with a warning.
        warnings.filterwarnings("ignore", message=".*AWS::SQS::QueuePolicy.*")
        cfn.create_stack(StackName=f"sidecar-{tag}", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                         Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    described = cfn.describe_stacks(StackName=f"sidecar-{tag}")["Stacks"][0]
    assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
    out = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
    documents = {name: policy_document(iam_moto, out[name]) for name in ("SidecarPolicyArn", "WordPressPolicyArn")}
    made = AwsStack(iam_moto, out["QueueUrl"], out["DlqUrl"], bucket, iam_moto.client("sqs"), iam_moto.client("s3"))
    return TemplateStack(
        iam_moto, made, out, documents,
        sidecar=holding(iam_moto, f"sidecar-{tag}", documents["SidecarPolicyArn"], managed=out["SidecarPolicyArn"]),
        wordpress=holding(iam_moto, f"wordpress-{tag}", documents["WordPressPolicyArn"],
                          managed=out["WordPressPolicyArn"]))


@pytest.fixture
def aws(stack: TemplateStack) -> AwsStack:
    """Overrides conftest's: `env`, `spawn_daemon` and the helpers point at the stack's queues and bucket."""
    return stack.aws


@pytest.fixture
def stack_env(env: dict[str, str]) -> dict[str, str]:
    """conftest's environment for the stack: recordings under the template's AudioPrefix, and the DLQ found
    from the RedrivePolicy (GetQueueUrl)."""
    return {**env, **STACK_SETTINGS}


def sidecar(keys: Keys, env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m consumer ARGS` with these credentials (and none of the developer's own)."""
    mine = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", "consumer", *args], capture_output=True, text=True, timeout=90,
                          env={**mine, **env, **keys.env()}, cwd=cwd, check=False)


def rows(listing: subprocess.CompletedProcess[str]) -> list[list[str]]:
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return [line.split("\t") for line in listing.stdout.strip().splitlines()[1:]]


def denied(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return False


def test_every_command_runs_with_only_the_template_policies(
        stack: TemplateStack, stack_env: dict[str, str], spawn_daemon: Callable[..., DaemonProcess], wordpress: Any,
        tmp_path: Path) -> None:
    aws, env, sc, wp = stack.aws, stack_env, stack.sidecar, stack.wordpress

    # WordPress publishes: a recording uploaded under AudioPrefix with its signed job, and a job whose
    # recording is not there yet.
    out = sidecar(wp, env, "enqueue", str(SPEECH), "--job-id", "iam-good", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["s3_key"] == "audio/iam-good.wav"
    out = sidecar(wp, env, "enqueue", "audio/iam-late.wav", "--job-id", "iam-late", cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    out = sidecar(sc, env, "check", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(line.startswith("[ ok ]") for line in out.stdout.strip().splitlines()), out.stdout

    daemon = spawn_daemon({**STACK_SETTINGS, **sc.env()})
    daemon.wait_ready()
    wait_for(lambda: wordpress.terminal("iam-good") and wordpress.terminal("iam-late"), timeout=60,
             what="a terminal callback for both jobs")
    assert [c["status"] for c in wordpress.terminal("iam-good")] == ["completed"]
    [late] = wordpress.terminal("iam-late")
    assert late["status"] == "failed" and late["error"]["code"] == "audio_not_found"
    assert aws.s3.head_object(Bucket=aws.bucket, Key="transcripts/iam-good.job.json")["ContentLength"] > 0
    wait_for(lambda: aws.counts(aws.dlq_url) == (1, 0), timeout=30, what="the dead letter, visible")

    # Listed twice: the first listing used to be refused the hand-back and leave the letter hidden.
    for _ in range(2):
        [row] = rows(sidecar(sc, env, "dlq", "ls", cwd=tmp_path))
        assert row[:2] == ["iam-late", "audio_not_found"]
        assert aws.counts(aws.dlq_url) == (1, 0)

    # WordPress uploads the recording the way its PHP does (PutObject under AudioPrefix); redrive it.
    stack.server.client_as(wp, "s3").put_object(Bucket=aws.bucket, Key="audio/iam-late.wav", Body=SPEECH.read_bytes())
    out = sidecar(sc, env, "dlq", "redrive", "--job-id", "iam-late", cwd=tmp_path)
    assert out.returncode == 0 and "redrove 1" in out.stderr, out.stderr
    wait_for(lambda: [c for c in wordpress.terminal("iam-late") if c["status"] == "completed"], timeout=60,
             what="the redriven job completed")

    # A job WordPress signed with another secret is dead-lettered without a callback; purge empties the DLQ.
    as_wordpress = dataclasses.replace(aws, sqs=stack.server.client_as(wp, "sqs"))
    send_job(as_wordpress, "iam-forged", "audio/iam-good.wav", secret="not-the-secret-0123456789")
    wait_for(lambda: aws.counts(aws.dlq_url) == (1, 0), timeout=30, what="the forged job dead-lettered")
    out = sidecar(sc, env, "dlq", "purge", "--yes", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: aws.counts(aws.dlq_url) == (0, 0), timeout=10, what="the DLQ purged")
    assert aws.counts() == (0, 0)

    daemon.proc.terminate()
    assert daemon.proc.wait(30) == 0
    log = daemon.log_path.read_text()
    assert "AccessDenied" not in log and "(403)" not in log and "Forbidden" not in log, log[-3000:]


def test_moto_enforces_the_template_policies(stack: TemplateStack, stack_env: dict[str, str], tmp_path: Path) -> None:
    """Without this, the test above could pass against a server that checks nothing."""
    server, aws, sc, wp = stack.server, stack.aws, stack.sidecar, stack.wordpress
    with pytest.raises(ClientError, match="InvalidClientTokenId"):  # a key IAM does not know
        server.client_as(Keys("testing", "testing"), "sqs").get_queue_attributes(QueueUrl=aws.queue_url)
    assert denied(lambda: server.client_as(wp, "sqs").receive_message(QueueUrl=aws.queue_url, WaitTimeSeconds=0))
    assert denied(lambda: server.client_as(wp, "s3").get_object(Bucket=aws.bucket, Key="audio/x.wav"))
    assert denied(lambda: server.client_as(sc, "s3").put_object(Bucket=aws.bucket, Key="audio/x.wav", Body=b"x"))
    assert denied(lambda: server.client_as(sc, "s3").put_object(Bucket=aws.bucket, Key="other/x", Body=b"x"))
    assert denied(lambda: server.client_as(sc, "sqs").purge_queue(QueueUrl=aws.queue_url))

    out = sidecar(wp, stack_env, "dlq", "ls", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "GetQueueAttributes" in out.stderr


def test_moto_checks_differ_from_aws_where_aliases_say_so(stack: TemplateStack) -> None:
    """Each alias of `moto_aliases` stands for a difference between moto and AWS that still exists: with the
    template's sidecar policy alone, moto refuses what AWS allows."""
    server, aws = stack.server, stack.aws
    bare = server.principal(f"bare-{uuid.uuid4().hex[:8]}", managed=(stack.outputs["SidecarPolicyArn"],))
    sqs, s3 = server.client_as(bare, "sqs"), server.client_as(bare, "s3")
    aws.sqs.send_message(QueueUrl=aws.dlq_url, MessageBody="{}")
    [m] = sqs.receive_message(QueueUrl=aws.dlq_url, VisibilityTimeout=0)["Messages"]
    entry = {"Id": "0", "ReceiptHandle": m["ReceiptHandle"]}
    assert denied(lambda: sqs.change_message_visibility_batch(QueueUrl=aws.dlq_url,
                                                              Entries=[{**entry, "VisibilityTimeout": 0}]))
    sqs.change_message_visibility(QueueUrl=aws.dlq_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0)
    assert denied(lambda: sqs.delete_message_batch(QueueUrl=aws.dlq_url, Entries=[entry]))
    assert denied(lambda: sqs.send_message_batch(QueueUrl=aws.queue_url, Entries=[{"Id": "0", "MessageBody": "{}"}]))
    assert denied(lambda: s3.head_bucket(Bucket=aws.bucket))
    s3.list_objects_v2(Bucket=aws.bucket)  # s3:ListBucket is granted
    assert denied(lambda: sqs.get_queue_url(QueueName=aws.dlq_url.rsplit("/", 1)[1]))


def test_dlq_ls_hands_back_what_it_walked_when_it_fails_midway(stack: TemplateStack) -> None:
    """E.g. `sidecar dlq ls | head`: the output breaks after a few rows, with most letters received."""
    aws = stack.aws
    for i in range(0, 25, 5):
        aws.sqs.send_message_batch(QueueUrl=aws.dlq_url, Entries=[
            {"Id": str(n), "MessageBody": json.dumps({"job_id": f"dead-{i + n}"})} for n in range(5)])
    dlq = SqsQueue(stack.server.client_as(stack.sidecar, "sqs"), aws.dlq_url)
    printed: list[str] = []

    def out(line: str) -> None:
        if len(printed) == 4:  # the header and three rows
            raise BrokenPipeError(32, "Broken pipe")
        printed.append(line)

    with pytest.raises(BrokenPipeError):
        list_dead_letters(dlq, out=out)
    assert aws.counts(aws.dlq_url) == (25, 0)  # at once, not after LIST_VISIBILITY


def test_dlq_ls_that_cannot_hand_back_says_so(stack: TemplateStack, stack_env: dict[str, str], tmp_path: Path) -> None:
    """Credentials without sqs:ChangeMessageVisibility on the DLQ (the template before the fix): the listing
    says the letters stay hidden and for how long, and the next listing says they exist."""
    server, aws = stack.server, stack.aws
    document = json.loads(json.dumps(stack.documents["SidecarPolicyArn"]))
    for st in document["Statement"]:
        if st["Resource"] == stack.outputs["DlqArn"]:
            st["Action"] = [a for a in as_list(st["Action"]) if a != "sqs:ChangeMessageVisibility"]
    no_hand_back = holding(server, f"no-hand-back-{uuid.uuid4().hex[:8]}", document)
    for n in range(2):
        aws.sqs.send_message(QueueUrl=aws.dlq_url, MessageBody=json.dumps({"job_id": f"dead-{n}"}))

    out = sidecar(no_hand_back, stack_env, "dlq", "ls", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert sorted(line.split("\t")[0] for line in out.stdout.strip().splitlines()[1:]) == ["dead-0", "dead-1"]
    hidden = f"2 dead letter(s) could not be made visible again and stay hidden for up to {LIST_VISIBILITY} s"
    assert hidden in out.stderr

    listing = sidecar(stack.sidecar, stack_env, "dlq", "ls", cwd=tmp_path)
    assert rows(listing) == []
    assert "about 2 more dead letter(s) were hidden when the listing started" in listing.stderr
