"""Command line: `sidecar run|dev|check|enqueue|intake|schema|dlq`. Builds Settings, logging and clients here.

A configuration problem exits with status 2 and one line per problem naming the variable; no command
prints a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from consumer import __version__
from consumer.aws import explain_aws_error
from consumer.errors import ConfigError, ConsumerError
from consumer.settings import Settings, load_settings

EXIT_CONFIG = 2

log = logging.getLogger("consumer")


def _env_file_readable(args: argparse.Namespace) -> None:
    named = args.env_file  # None: the optional .env of the working directory
    if named is not None and not os.access(named, os.R_OK):
        raise ConfigError([f"--env-file {named}: no such file, or not readable by this user (sudo?)"])


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    _env_file_readable(args)
    return load_settings(env_file=args.env_file or ".env", **overrides)


def _logging(settings: Settings) -> None:
    from consumer.logs import setup_logging

    setup_logging(level=settings.log_level, fmt=settings.log_format, log_file=settings.log_file,
                  secrets=settings.secret_values())


def _clients(settings: Settings) -> Any:
    from consumer.aws import make_clients

    return make_clients(settings)


def cmd_run(args: argparse.Namespace, overrides: dict[str, Any] | None = None,
            on_exit: Callable[[], None] | None = None) -> int:
    from consumer.app import build_daemon, ensure_can_listen, install_signal_handlers
    from consumer.sdnotify import Notifier

    settings = _settings(args, **(overrides or {}))
    _logging(settings)
    ensure_can_listen(settings.metrics_host, settings.metrics_port)  # before the queue is touched
    sqs, s3 = _clients(settings)
    daemon = build_daemon(settings, sqs=sqs, s3=s3, notifier=Notifier(os.environ.get("NOTIFY_SOCKET")))
    port = daemon.serve(host=settings.metrics_host, port=settings.metrics_port).port
    log.info("metrics_listening", extra={"host": settings.metrics_host, "port": port})
    install_signal_handlers(daemon.worker)
    status = daemon.run(drain=getattr(args, "drain", False))
    if on_exit:
        on_exit()
    # Done: every message is settled or handed back. A job released at shutdown may still have threads
    # waiting on OpenAI (a chunk pool's threads are not daemon threads, so the interpreter would wait up
    # to TRANSCRIBE_TIMEOUT for them, past systemd's TimeoutStopSec); nothing they could do is wanted.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def cmd_dev(args: argparse.Namespace) -> int:
    from consumer.app import ensure_can_listen
    from consumer.devstack import DEV_METRICS_PORT, SAMPLE, announce_second_shell, local_overrides, start_local_stack

    settings = _settings(args)
    overrides: dict[str, Any] = {}
    if "metrics_port" not in settings.model_fields_set:  # never prod's 9002: `make run` on the prod host
        overrides["metrics_port"] = DEV_METRICS_PORT
    # Checked before anything starts: a port in use must not leave a half-started stack behind a traceback.
    ensure_can_listen(settings.metrics_host, overrides.get("metrics_port", settings.metrics_port))
    if settings.sqs_queue_url:
        return cmd_run(args, overrides)
    _logging(settings)
    overrides |= local_overrides(settings, start_local_stack(settings.aws_region))
    local = _settings(args, **overrides)
    env_file = announce_second_shell(local)
    if local.transcriber_kind == "openai" or SAMPLE.exists():
        from consumer.ops import enqueue

        sqs, s3 = _clients(local)
        if SAMPLE.exists():
            sent = enqueue(local, sqs, s3, str(SAMPLE), job_id="sample-recording")
            log.info("sample_enqueued", extra=sent)
    return cmd_run(args, overrides, on_exit=lambda: env_file.unlink(missing_ok=True))


def cmd_check(args: argparse.Namespace) -> int:
    from consumer.check import check, dependency_checks
    from consumer.settings import load_settings_leniently

    _env_file_readable(args)
    settings, problems = load_settings_leniently(env_file=args.env_file or ".env")
    sqs, s3 = _clients(settings)
    return check(settings, problems, dependency_checks(settings, sqs, s3, probe=args.probe))


def cmd_enqueue(args: argparse.Namespace) -> int:
    from consumer.ops import enqueue

    settings = _settings(args)
    try:
        metadata = json.loads(args.metadata) if args.metadata else None
    except ValueError as exc:
        raise ConfigError([f"--metadata: not JSON: {exc}"]) from None
    sqs, s3 = _clients(settings)
    print(json.dumps(enqueue(settings, sqs, s3, args.source, job_id=args.job_id, metadata=metadata,
                             language=args.language)))
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    import signal
    import threading

    from consumer.intake import Intake, IntakeServer
    from consumer.sdnotify import Notifier

    settings = _settings(args)
    problems = settings.intake_problems()
    if problems:
        raise ConfigError(problems)
    _logging(settings)
    sqs, _ = _clients(settings)
    try:
        server = IntakeServer(Intake(settings, sqs), host=settings.intake_host, port=settings.intake_port)
    except OSError as exc:
        raise ConfigError([f"INTAKE_PORT: cannot listen on {settings.intake_host}:{settings.intake_port}: "
                           f"{exc.strerror or exc}"]) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    log.info("intake_listening", extra={"host": settings.intake_host, "port": server.port,
                                        "queue": settings.sqs_queue_url})
    notifier = Notifier(os.environ.get("NOTIFY_SOCKET"))
    notifier.ready(f"listening on {settings.intake_host}:{server.port}")
    stop.wait()
    notifier.stopping("stopping")
    log.info("intake_stopping")
    server.stop()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from consumer.models import json_schema

    print(json.dumps(json_schema(args.name), indent=2))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from consumer import dlq
    from consumer.app import find_dlq
    from consumer.sqs import SqsQueue

    settings = _settings(args)
    if not settings.sqs_queue_url:
        raise ConfigError(["SQS_QUEUE_URL: required (the DLQ is found from the queue's RedrivePolicy)"])
    sqs, _ = _clients(settings)
    source = SqsQueue(sqs, settings.sqs_queue_url)
    dlq_url, _ = find_dlq(sqs, source, settings)
    if not dlq_url:
        raise ConfigError(["SQS_DLQ_URL: not set and the queue has no RedrivePolicy"])
    dead = SqsQueue(sqs, dlq_url)
    if args.action == "ls":
        count = dlq.list_dead_letters(dead)
        print(f"{count} message(s) in {dlq_url}", file=sys.stderr)
    elif args.action == "redrive":
        if not args.all and not args.job_id:
            raise ConfigError(["dlq redrive: name --job-id ID (repeatable) or --all"])
        named = None if args.all else set(args.job_id)
        moved = dlq.redrive(dead, source, job_ids=named)
        print(f"redrove {moved} message(s) to {settings.sqs_queue_url}", file=sys.stderr)
        if named and moved < len(named):
            which = f"job {next(iter(named))}" if len(named) == 1 else f"{len(named) - moved} of the jobs named"
            print(f"error: no such {which} in the DLQ (`sidecar dlq ls` lists what is there)", file=sys.stderr)
            return 1
    elif args.action == "purge":
        if not args.yes:
            raise ConfigError(["dlq purge: deletes every dead letter for good; add --yes to confirm"])
        dead.purge()
        print(f"purged {dlq_url}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar",
        description="SalesTrainer transcription sidecar: consumes transcription jobs from SQS, transcribes the "
                    "recording from S3 and calls WordPress back. Configuration comes from the environment and "
                    "an optional .env file (see .env.example).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--env-file", metavar="PATH",
                   help="read variables from this file (default: .env in the working directory); the "
                   "environment wins over it. E.g. /etc/salestrainer-sidecar/prod.env, the unit's EnvironmentFile")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon", description="Long-poll SQS and process jobs until "
                         "SIGTERM/SIGINT (graceful; a second signal exits at once).")
    run.add_argument("--drain", action="store_true", help="exit once the queue is empty (batch use)")
    run.set_defaults(fn=cmd_run)

    dev = sub.add_parser("dev", help="run the daemon; on an embedded local stack when SQS_QUEUE_URL is unset",
                         description="What `make run` calls. Without SQS_QUEUE_URL it starts moto (SQS+S3) "
                         "on 127.0.0.1, a WordPress stand-in that prints callbacks, enqueues a sample recording "
                         "and runs the daemon against them.")
    dev.set_defaults(fn=cmd_dev, drain=False)

    check = sub.add_parser("check", help="validate the configuration and reach every dependency",
                           description="Prints every configuration problem at once, one [FAIL] line each, then "
                           "reaches the S3 bucket (HeadBucket), the queue (depth and RedrivePolicy), the "
                           "transcriber (OpenAI: is TRANSCRIBE_MODEL in the endpoint's model list, when it keeps "
                           "one; local: loads the model) and the WordPress callback host (TCP connect, nothing is "
                           "posted). A check whose variables are unset or wrong is skipped with the reason. One "
                           "line per check with a mark; exit 2 on a configuration error, else 1 if any check "
                           "failed. Secrets are never printed.")
    check.add_argument("--probe", action="store_true",
                       help="also transcribe a one-second speech clip shipped with the package, with exactly the "
                       "request a job would send, and print the endpoint's own error if it refuses (costs a "
                       "fraction of a cent); deploy.sh runs this before restarting prod")
    check.set_defaults(fn=cmd_check)

    enq = sub.add_parser("enqueue", help="upload a recording (if local) and send a signed job",
                         description="Send a job for PATH_OR_S3_KEY. A local file is uploaded to S3_BUCKET first "
                         "(under S3_KEY_PREFIX). The job is signed with the first SIDE_CAR_SECRET when set.")
    enq.add_argument("source", metavar="PATH_OR_S3_KEY")
    enq.add_argument("--job-id", help="job id (default: a random one)")
    enq.add_argument("--metadata", help="JSON object echoed back in the callback")
    enq.add_argument("--language", help="ISO-639-1 language hint")
    enq.set_defaults(fn=cmd_enqueue)

    intake = sub.add_parser("intake", help="accept the old sidecar's POST /transcribe and queue signed jobs",
                            description="An HTTP server on INTAKE_HOST:INTAKE_PORT (default 127.0.0.1:9010) for the "
                            "cut-over: it takes the old sidecar's POST /transcribe (and POST /process-s3) with "
                            "{\"s3_key\": ...}, authenticated by SIDE_CAR_SECRET (Authorization: Bearer, the "
                            "INTAKE_SECRET_HEADER header or the INTAKE_SECRET_FIELD body field), puts a signed job on "
                            "SQS_QUEUE_URL and answers 202 with its job_id; GET /health answers 200. The daemon "
                            "(`sidecar run`) does the rest. Runs until SIGTERM/SIGINT.")
    intake.set_defaults(fn=cmd_intake)

    schema = sub.add_parser("schema", help="print a contract's JSON Schema",
                            description="JSON Schema of the job message or the callback payload.")
    schema.add_argument("name", choices=["job", "callback"])
    schema.set_defaults(fn=cmd_schema)

    dlq = sub.add_parser("dlq", help="list, redrive or purge dead letters",
                         description="The dead-letter queue is SQS_DLQ_URL or the queue's RedrivePolicy target.")
    dsub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser("ls", help="list dead letters: job_id, error_code, failed_at, receive count",
                    description="Print one tab-separated row per dead letter. Messages stay in the DLQ.")
    red = dsub.add_parser("redrive", help="move dead letters back to the source queue",
                          description="Send dead letters back to SQS_QUEUE_URL with their original body and "
                          "signature, then delete them from the DLQ. Stored transcripts are reused, so a "
                          "redrive after a WordPress outage only re-sends callbacks.")
    red.add_argument("--job-id", action="append", help="redrive this job (repeatable)")
    red.add_argument("--all", action="store_true", help="redrive every dead letter")
    pur = dsub.add_parser("purge", help="delete every dead letter",
                          description="Delete every message in the DLQ for good (SQS PurgeQueue; takes up to 60 s "
                          "on AWS). Refuses without --yes.")
    pur.add_argument("--yes", action="store_true", help="confirm that the dead letters may be lost")
    dlq.set_defaults(fn=cmd_dlq)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from consumer.logs import say

    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"configuration error: {problem}")
        return EXIT_CONFIG
    except ConsumerError as exc:
        aws = explain_aws_error(exc)
        say(f"error: {exc.code}: {aws}" if aws else f"error: {exc}")
        return 1
    except (BotoCoreError, ClientError) as exc:  # a boto3 call outside the adapters (upload, head)
        say(f"error: {explain_aws_error(exc) or exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
