"""deploy/cloudformation.yaml: cfn-lint is clean, and the stack created in moto has the queues with their
redrive policy, retention and encryption, least-privilege policies, and outputs that resolve; the daemon run
as a process against the queues a stack made in the moto server completes a job and dead-letters a bad one;
the runbook's deploy commands acknowledge the IAM resources and, run as written with the AWS CLI, create the
stack. (That the policies are enough for every command is tests/test_iam.py's business.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.decode.cfn_yaml import loads as load_template  # type: ignore[import-untyped]
from moto import mock_aws

from tests.conftest import DaemonProcess, send_job, upload
from tests.stack import require_tool, wait_for
from tests.stack.aws import AwsStack, MotoServer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "cloudformation.yaml"
RUNBOOK = ROOT / "docs" / "operations.md"
REGION = "us-east-1"
BUCKET = "salestrainer-recordings-test"
FOUR_DAYS, FOURTEEN_DAYS = 4 * 86400, 14 * 86400


def test_cfn_lint_is_clean() -> None:
    cfn_lint = require_tool("cfn-lint", "pip install -e '.[dev]' brings it")
    proc = subprocess.run([cfn_lint, str(TEMPLATE)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.fixture
def in_process_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process moto (mock_aws). Not named `aws`: that would shadow conftest's moto-server `aws`, which
    `env` and `spawn_daemon` are built on."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
        yield


def create_stack(name: str, **parameters: str) -> dict[str, str]:
    """Create the stack in moto and return its outputs."""
    cfn = boto3.client("cloudformation", region_name=REGION)
    params = [{"ParameterKey": k, "ParameterValue": v} for k, v in {"BucketName": BUCKET, **parameters}.items()]
    with warnings.catch_warnings():
        # moto does not model AWS::SQS::QueuePolicy (the TLS-only deny); it skips it with a warning.
        warnings.filterwarnings("ignore", message=".*AWS::SQS::QueuePolicy.*")
        cfn.create_stack(StackName=name, TemplateBody=TEMPLATE.read_text(), Parameters=params,
                         Capabilities=["CAPABILITY_IAM"])  # as AWS demands; moto does not check
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def queue_attributes(url: str) -> dict[str, str]:
    sqs = boto3.client("sqs", region_name=REGION)
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def policy_statements(arn: str) -> list[dict[str, Any]]:
    iam = boto3.client("iam", region_name=REGION)
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]
    if isinstance(document, str):
        document = json.loads(document)
    return list(document["Statement"])


def grants(statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(action, resource) pairs the Allow statements grant."""
    out = set()
    for st in statements:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        out |= {(a, r) for a in actions for r in resources}
    return out


def test_stack_creates_queues_with_redrive_and_retention(in_process_aws: None) -> None:
    out = create_stack("salestrainer-prod")
    assert {"QueueUrl", "DlqUrl", "QueueArn", "DlqArn", "SidecarPolicyArn", "WordPressPolicyArn"} <= set(out)
    assert out["QueueUrl"].endswith("/salestrainer-prod-jobs")
    assert out["DlqUrl"].endswith("/salestrainer-prod-jobs-dlq")

    main = queue_attributes(out["QueueUrl"])
    dlq = queue_attributes(out["DlqUrl"])
    redrive = json.loads(main["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dlq["QueueArn"] == out["DlqArn"]
    assert int(redrive["maxReceiveCount"]) == 5
    assert int(main["VisibilityTimeout"]) == 120
    assert int(main["MessageRetentionPeriod"]) == FOUR_DAYS
    assert int(dlq["MessageRetentionPeriod"]) == FOURTEEN_DAYS
    assert int(main["ReceiveMessageWaitTimeSeconds"]) == 20
    assert main["SqsManagedSseEnabled"] == dlq["SqsManagedSseEnabled"] == "true"


def test_parameters_reach_the_queues(in_process_aws: None) -> None:
    out = create_stack("salestrainer-dev", Environment="dev", VisibilityTimeout="300", MaxReceiveCount="3")
    assert out["QueueUrl"].endswith("/salestrainer-dev-jobs")
    main = queue_attributes(out["QueueUrl"])
    assert int(main["VisibilityTimeout"]) == 300
    assert int(json.loads(main["RedrivePolicy"])["maxReceiveCount"]) == 3


def test_outputs_resolve_to_working_queues(in_process_aws: None) -> None:
    out = create_stack("salestrainer-prod")
    sqs = boto3.client("sqs", region_name=REGION)
    sqs.send_message(QueueUrl=out["QueueUrl"], MessageBody="{}")
    got = sqs.receive_message(QueueUrl=out["QueueUrl"], WaitTimeSeconds=0)["Messages"]
    assert len(got) == 1
    # The daemon finds the DLQ from the RedrivePolicy when SQS_DLQ_URL is unset.
    dlq_name = json.loads(queue_attributes(out["QueueUrl"])["RedrivePolicy"])["deadLetterTargetArn"].split(":")[-1]
    assert sqs.get_queue_url(QueueName=dlq_name)["QueueUrl"] == out["DlqUrl"]


def test_policies_are_least_privilege(in_process_aws: None) -> None:
    out = create_stack("salestrainer-prod", AudioPrefix="audio/", ResultsPrefix="transcripts/")
    queue, dlq = out["QueueArn"], out["DlqArn"]
    audio = f"arn:aws:s3:::{BUCKET}/audio/*"
    results = f"arn:aws:s3:::{BUCKET}/transcripts/*"

    sidecar = grants(policy_statements(out["SidecarPolicyArn"]))
    expected = {
        *{(a, queue) for a in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility")},
        ("sqs:GetQueueAttributes", queue),
        ("sqs:SendMessage", queue),  # `sidecar dlq redrive`
        *{(a, dlq) for a in ("sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage")},
        ("sqs:ChangeMessageVisibility", dlq),  # `sidecar dlq ls|redrive` hand back what they walked
        ("sqs:GetQueueAttributes", dlq),
        ("sqs:GetQueueUrl", dlq),
        ("sqs:PurgeQueue", dlq),  # `sidecar dlq purge`
        ("s3:GetObject", audio),
        ("s3:GetObject", results),
        ("s3:PutObject", results),
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}"),  # 404 rather than 403 for a missing key
    }
    assert sidecar == expected, sidecar ^ expected

    wordpress = grants(policy_statements(out["WordPressPolicyArn"]))
    assert wordpress == {("sqs:SendMessage", queue), ("s3:PutObject", audio)}

    for action, resource in sidecar | wordpress:
        assert "*" not in action
        assert resource.endswith("/*") or "*" not in resource


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_daemon_runs_against_the_stack_queues(moto_server: MotoServer, spawn_daemon: Callable[..., DaemonProcess],
                                              wordpress: Any) -> None:
    # moto in server mode (shared with the other e2e tests), so no mock_aws here: it patches botocore
    # for the whole process while active. Unique names keep this stack apart from other tests' queues.
    tag = uuid.uuid4().hex[:8]
    bucket = f"recordings-{tag}"
    moto_server.client("s3").create_bucket(Bucket=bucket)
    cfn = moto_server.client("cloudformation")
    params = {"BucketName": bucket, "NamePrefix": f"cfn-{tag}", "Environment": "dev", "VisibilityTimeout": "30"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*AWS::SQS::QueuePolicy.*")
        cfn.create_stack(StackName=f"sidecar-{tag}", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                         Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    stack = cfn.describe_stacks(StackName=f"sidecar-{tag}")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    out = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    made = AwsStack(moto_server, out["QueueUrl"], out["DlqUrl"], bucket, moto_server.client("sqs"),
                    moto_server.client("s3"))

    upload(made, "audio/good.wav")
    send_job(made, "cfn-good", "audio/good.wav")
    send_job(made, "cfn-missing", "audio/missing.wav")
    daemon = spawn_daemon({"SQS_QUEUE_URL": out["QueueUrl"], "SQS_DLQ_URL": "", "S3_BUCKET": bucket})
    daemon.wait_ready()

    wait_for(lambda: wordpress.terminal("cfn-good") and wordpress.terminal("cfn-missing"), timeout=60,
             what="a terminal callback for both jobs")
    [good] = wordpress.terminal("cfn-good")
    assert good["status"] == "completed"
    [failed] = wordpress.terminal("cfn-missing")
    assert failed["status"] == "failed" and failed["error"]["code"] == "audio_not_found"

    # The daemon found the stack's DLQ from the RedrivePolicy and dead-lettered the bad job there.
    [dead] = wait_for(made.dlq_messages, timeout=30, what="the dead letter in the stack's DLQ")
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs["error_code"] == "audio_not_found"
    assert json.loads(dead["Body"])["job_id"] == "cfn-missing"
    wait_for(lambda: made.counts() == (0, 0), timeout=30, what="the stack's job queue empty")


# A stack with IAM resources needs CAPABILITY_IAM, and CAPABILITY_NAMED_IAM when one of them has a custom
# name; otherwise InsufficientCapabilitiesException "Requires capabilities : [CAPABILITY_IAM]" (CreateStack
# API reference, `Capabilities`; REALITY.md). moto enforces neither, so the rule is checked here.
IAM_NAME_PROPERTIES = {"AWS::IAM::ManagedPolicy": "ManagedPolicyName", "AWS::IAM::Role": "RoleName",
                       "AWS::IAM::User": "UserName", "AWS::IAM::Group": "GroupName",
                       "AWS::IAM::InstanceProfile": "InstanceProfileName"}


def required_capabilities(template: Path) -> set[str]:
    needed = set()
    for resource in load_template(template.read_text())["Resources"].values():
        kind = resource["Type"]
        if kind.startswith("AWS::IAM::"):
            named = IAM_NAME_PROPERTIES.get(kind) in resource.get("Properties", {})
            needed.add("CAPABILITY_NAMED_IAM" if named else "CAPABILITY_IAM")
    return needed


def runbook_deploy_commands() -> list[list[str]]:
    """Each `aws cloudformation deploy` of the runbook's shell blocks, as the shell would split it."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", RUNBOOK.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("aws cloudformation deploy"):
                commands.append(shlex.split(line))
    return commands


def option(command: list[str], name: str) -> list[str]:
    """The values after `name`, up to the next option (the AWS CLI's list options take several)."""
    if name not in command:
        return []
    rest = command[command.index(name) + 1:]
    return list(next((rest[:i] for i, arg in enumerate(rest) if arg.startswith("--")), rest))


def test_runbook_deploy_commands_acknowledge_the_iam_resources() -> None:
    commands = runbook_deploy_commands()
    assert len(commands) == 2, "expected the prod and dev deploy commands in docs/operations.md"
    needed = required_capabilities(TEMPLATE)
    assert needed == {"CAPABILITY_IAM"}  # the policies are unnamed: CAPABILITY_NAMED_IAM would be too much
    parameters = load_template(TEMPLATE.read_text())["Parameters"]
    for command in commands:
        assert needed <= set(option(command, "--capabilities")), f"{shlex.join(command)}: needs {needed}"
        assert (ROOT / option(command, "--template-file")[0]).resolve() == TEMPLATE
        overrides = dict(o.split("=", 1) for o in option(command, "--parameter-overrides"))
        assert set(overrides) <= set(parameters), set(overrides) - set(parameters)
        assert {name for name, p in parameters.items() if "Default" not in p} <= set(overrides)


@pytest.mark.timeout(120)
def test_runbook_deploy_commands_run_as_written(moto_server: MotoServer) -> None:
    """The AWS CLI itself runs each command against moto; its own debug log shows what it asked of
    CloudFormation, so the capabilities are checked on the request moto would not refuse."""
    aws = require_tool("aws", "pip install awscli, or the AWS CLI v2")
    bucket = f"recordings-{uuid.uuid4().hex[:8]}"
    moto_server.client("s3").create_bucket(Bucket=bucket)
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    cfn = moto_server.client("cloudformation")
    for command in runbook_deploy_commands():
        as_written = [aws, *(arg.replace("<recordings-bucket>", bucket) for arg in command[1:])]
        proc = subprocess.run([*as_written, "--debug"], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                              timeout=90, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert "Successfully created/updated stack" in proc.stdout
        [request] = [line for line in proc.stderr.splitlines()
                     if "Making request for OperationModel(name=CreateChangeSet)" in line]
        sent = set(re.findall(r"'Capabilities\.member\.\d+': '(\w+)'", request))
        assert required_capabilities(TEMPLATE) <= sent, sent

        name = option(command, "--stack-name")[0]
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
        # (moto leaves Outputs off a stack made by a change set, so the resources are asked for instead;
        # the QueuePolicy it does not model shows up as a nameless one.)
        made = {r.get("LogicalResourceId"): r.get("PhysicalResourceId")
                for r in cfn.list_stack_resources(StackName=name)["StackResourceSummaries"]}
        environment = dict(o.split("=", 1) for o in option(command, "--parameter-overrides"))["Environment"]
        assert made["JobQueue"].endswith(f"/salestrainer-{environment}-jobs")
        assert made["SidecarPolicy"].startswith("arn:aws:iam::")
