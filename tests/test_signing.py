"""Signatures: the published test vectors (checked with real PHP), the contract's PHP snippet run verbatim,
rotation, tampering, and properties (hypothesis)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import PermanentError
from consumer.settings import load_settings
from consumer.signing import sign, signature_digest, verify
from consumer.sqs import Message
from consumer.validate import parse_job
from tests.stack import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"

# The vectors in docs/contract.md: any implementation (WordPress' PHP included) must reproduce them.
VECTOR_SECRET, VECTOR_T = "s3cr3t", 1700000000
VECTOR_BODY = '{"job_id":"job-1","s3_key":"audio/job-1.webm"}'
VECTOR_DIGEST = "7fb9dec6c30426d339a6ed8ccf9e2770870f644a40985c5067b47842fb66bb52"


def test_vector_matches_docs_and_an_independent_hmac():
    assert signature_digest(VECTOR_SECRET, VECTOR_T, VECTOR_BODY) == VECTOR_DIGEST
    docs = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    assert f"t={VECTOR_T},v1={VECTOR_DIGEST}" in docs, "docs/contract.md must carry the current test vector"
    if shutil.which("openssl"):  # a second implementation, as WordPress' hash_hmac would be
        out = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", VECTOR_SECRET], check=True,
                             input=f"{VECTOR_T}.{VECTOR_BODY}".encode(), capture_output=True).stdout.decode()
        assert out.strip().endswith(VECTOR_DIGEST)


# The same job as WordPress' wp_json_encode() writes it (flags 0: `/` as `\\/`, non-ASCII as \\uXXXX with
# surrogate pairs) and with JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE. Different bytes, different
# signatures, one job: the signature is over the exact bytes sent, whatever the flags.
PHP_JOB = ("['job_id' => 1234, 's3_key' => 'audio/2026/11/wp-1234.webm', 'language' => 'de_DE', "
           "'metadata' => ['post_id' => 1234, 'title' => 'Grüße 😀']]")
PHP_VECTORS = {
    "0": ('{"job_id":1234,"s3_key":"audio\\/2026\\/11\\/wp-1234.webm","language":"de_DE",'
          '"metadata":{"post_id":1234,"title":"Gr\\u00fc\\u00dfe \\ud83d\\ude00"}}',
          "b731ad51fdbc8128c1674a54643bddb7c048cc9c0340a7d6480294481d8a5fb3"),
    "JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE": (
        '{"job_id":1234,"s3_key":"audio/2026/11/wp-1234.webm","language":"de_DE",'
        '"metadata":{"post_id":1234,"title":"Grüße 😀"}}',
        "26f5af027738bc38b04e6bc6da0304571215fcc99e77f35b2f992d39ae91c0a3"),
}
SETTINGS = load_settings(env_file=None, s3_bucket="audio-bucket", side_car_secret=VECTOR_SECRET)


def _php() -> str:
    return require_tool("php", "Debian's php-cli; scripts/install-system-deps.sh installs it")


def _run_php(source: str) -> str:
    proc = subprocess.run([_php(), "-n", "-d", "display_errors=stderr", "-r", source], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout


def test_php_vectors_are_in_the_docs_and_verify_in_python():
    docs = CONTRACT.read_text(encoding="utf-8")
    jobs = []
    for body, digest in PHP_VECTORS.values():
        assert f"`{body}`" in docs and f"t={VECTOR_T},v1={digest}" in docs
        assert signature_digest(VECTOR_SECRET, VECTOR_T, body) == digest
        header = f"t={VECTOR_T},v1={digest}"
        jobs.append(parse_job(Message("m", "rh", body, attributes={"signature": header}), SETTINGS))
    assert jobs[0] == jobs[1]
    assert (jobs[0].job_id, jobs[0].language, jobs[0].metadata) == ("1234", "de", {"post_id": 1234,
                                                                                   "title": "Grüße 😀"})


@pytest.mark.parametrize("flags", list(PHP_VECTORS))
def test_real_php_reproduces_each_vector(flags):
    # wp_json_encode() is json_encode() with the caller's flags for any encodable value (WordPress 6.1,
    # wp-includes/functions.php); it only differs when json_encode fails on invalid UTF-8.
    out = _run_php(f"$b = json_encode({PHP_JOB}, {flags}); "
                   f"echo $b, \"\\n\", hash_hmac('sha256', '{VECTOR_T}.' . $b, '{VECTOR_SECRET}');")
    assert out.split("\n") == list(PHP_VECTORS[flags])


# What the test supplies around the contract's snippet: WordPress' functions and constants, and an SQS
# client that prints the request it was given (its array is what AWS SDK for PHP and AsyncAws both take).
PHP_HARNESS = """
function wp_json_encode($data, $options = 0, $depth = 512) { return json_encode($data, $options, $depth); }
$in = json_decode(file_get_contents('php://stdin'), true);
function get_locale() { global $in; return $in['locale']; }
define('SIDE_CAR_SECRET', $in['secret']);
define('SQS_QUEUE_URL', 'https://sqs.us-east-1.amazonaws.com/123456789012/salestrainer-jobs');
$sqs = new class {
    public function sendMessage(array $request): array {
        echo json_encode($request);
        return ['MessageId' => 'not-sent'];
    }
};
[$job_id, $s3_key, $post_id] = [$in['job_id'], $in['s3_key'], $in['post_id']];
"""


def contract_php_snippet() -> str:
    """The PHP block of docs/contract.md's "How WordPress signs", verbatim."""
    docs = CONTRACT.read_text(encoding="utf-8")
    section = docs[docs.index("How WordPress signs"):]
    match = re.search(r"```php\n(.*?)```", section, re.S)
    assert match, "docs/contract.md lost its PHP snippet"
    return match[1]


@pytest.mark.parametrize(("job_id", "s3_key", "post_id", "locale", "want_id", "want_language"), [
    (1234, "audio/2026/11/wp-1234.webm", 1234, "de_DE", "1234", "de"),
    ("wp-77:v2", "audio/übung/ß 1.m4a", 77, "pt_BR", "wp-77:v2", "pt"),
    (9223372036854775807, "audio/x.webm", 5, "en_US", "9223372036854775807", "en"),
])
def test_the_contract_php_snippet_run_verbatim_makes_a_job_the_daemon_takes(job_id, s3_key, post_id, locale,
                                                                          want_id, want_language):
    php = _php()
    stdin = json.dumps({"job_id": job_id, "s3_key": s3_key, "post_id": post_id, "locale": locale,
                        "secret": VECTOR_SECRET})
    proc = subprocess.run([php, "-n", "-d", "display_errors=stderr", "-r", PHP_HARNESS + contract_php_snippet()],
                          input=stdin, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    request = json.loads(proc.stdout)
    body = request["MessageBody"]
    assert "\\/" in body  # wp_json_encode's escaped slashes reached the wire, and were signed as such
    attribute = request["MessageAttributes"]["signature"]
    assert attribute["DataType"] == "String"
    job = parse_job(Message("m", "rh", body, attributes={"signature": attribute["StringValue"]}), SETTINGS)
    assert (job.job_id, job.s3_key, job.language, job.metadata) == (want_id, s3_key, want_language,
                                                                   {"post_id": post_id})


def test_php_empty_array_metadata_is_taken():
    body = _run_php("echo json_encode(['job_id' => 5, 's3_key' => 'audio/a.wav', 'metadata' => []]);")
    assert body.endswith('"metadata":[]}')
    job = parse_job(Message("m", "rh", body, attributes={"signature": sign(body, [VECTOR_SECRET])}), SETTINGS)
    assert (job.job_id, job.metadata) == ("5", {})


def test_round_trip_and_rotation():
    body = '{"job_id":"a","s3_key":"k"}'
    header = sign(body, ["new", "old"], timestamp=1000)
    verify(body, header, ["new"])
    verify(body, header, ["old", "new"])  # any configured secret verifies
    old = sign(body, ["old"], timestamp=1000)
    verify(body, old, ["new", "old"])
    both = f"t=1000,v1={signature_digest('old', 1000, body)},v1={signature_digest('new', 1000, body)}"
    verify(body, both, ["new"])


@pytest.mark.parametrize("header", [
    None, "", "garbage", "t=abc,v1=00", "v1=00", "t=1000", "t=1000,v1=" + "0" * 64, "t=" + "9" * 40 + ",v1=00",
    "x" * 5000,
])
def test_bad_headers_are_rejected(header):
    with pytest.raises(PermanentError) as err:
        verify("{}", header, ["secret"])
    assert err.value.code == "bad_signature"


def test_tampered_body_or_wrong_secret():
    header = sign('{"a":1}', ["k"], timestamp=5)
    with pytest.raises(PermanentError):
        verify('{"a":2}', header, ["k"])
    with pytest.raises(PermanentError):
        verify('{"a":1}', header, ["other"])


def test_max_age():
    header = sign("{}", ["k"], timestamp=1000)
    verify("{}", header, ["k"], max_age=60, now=1050)
    with pytest.raises(PermanentError, match="old"):
        verify("{}", header, ["k"], max_age=60, now=1100)


@given(body=st.text(max_size=300), secret=st.text(min_size=1, max_size=40), t=st.integers(0, 10**11))
def test_signed_bodies_round_trip(body, secret, t):
    verify(body, sign(body, [secret], timestamp=t), [secret])


@given(body=st.text(max_size=200), header=st.one_of(st.none(), st.text(max_size=300)))
def test_verifier_raises_only_bad_signature(body, header):
    try:
        verify(body, header, ["secret"])
    except PermanentError as exc:
        assert exc.code == "bad_signature"
