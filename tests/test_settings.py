"""Settings: defaults, the old variable names, cross-field checks, errors that name the variable."""

from __future__ import annotations

import pytest

from consumer.errors import ConfigError
from consumer.settings import load_settings, load_settings_leniently


def build(**values):
    return load_settings(env_file=None, **values)


def test_defaults_keep_the_old_service_conventions(monkeypatch):
    for var in ("METRICS_PORT", "METRICS_HOST", "TRANSCRIBE_MODEL", "SEND_X_SERVER_TOKEN_HEADER", "LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    s = build()
    assert s.metrics_port == 9002 and s.metrics_host == "127.0.0.1"
    assert s.transcribe_model == "gpt-transcribe"
    assert s.send_x_server_token_header is True
    assert s.concurrency == 4 and s.log_format == "json"


def test_reads_the_environment_with_the_old_names(monkeypatch):
    monkeypatch.setenv("S3_BUCKET", "bucket-a")
    monkeypatch.setenv("SIDE_CAR_SECRET", "new-secret, old-secret")
    monkeypatch.setenv("SEND_X_SERVER_TOKEN_HEADER", "false")
    monkeypatch.setenv("S3_ALLOWED_BUCKETS", "b2,b3")
    s = build()
    assert s.s3_bucket == "bucket-a"
    assert s.secrets == ["new-secret", "old-secret"]
    assert s.signature_required is True
    assert s.send_x_server_token_header is False
    assert s.allowed_buckets == {"bucket-a", "b2", "b3"}


def test_env_file_is_read(tmp_path):
    env = tmp_path / ".env"
    env.write_text("S3_BUCKET=from-file\nCONCURRENCY=7\n")
    assert load_settings(env_file=env).concurrency == 7


@pytest.mark.parametrize(("values", "variable"), [
    ({"concurrency": "0"}, "CONCURRENCY"),
    ({"metrics_port": "99999"}, "METRICS_PORT"),
    ({"log_format": "xml"}, "LOG_FORMAT"),
    ({"environment": "prod", "side_car_secret": ""}, "SIDE_CAR_SECRET"),
    ({"wp_side_car_callback": "http://wp.example.com/cb"}, "WP_SIDE_CAR_CALLBACK"),
    ({"wp_side_car_callback": "ftp://x"}, "WP_SIDE_CAR_CALLBACK"),
    ({"heartbeat_interval": "50", "visibility_timeout": "30"}, "HEARTBEAT_INTERVAL"),
    ({"require_signature": "true", "side_car_secret": ""}, "REQUIRE_SIGNATURE"),
    ({"transcriber": "openai", "openai_api_key": "", "openai_base_url": ""}, "OPENAI_API_KEY"),
])
def test_problems_name_the_variable(values, variable, monkeypatch):
    monkeypatch.delenv("SIDE_CAR_SECRET", raising=False)
    with pytest.raises(ConfigError) as err:
        build(**values)
    assert any(p.startswith(variable) for p in err.value.problems), err.value.problems


def test_insecure_callback_allowed_for_loopback_or_when_asked():
    build(wp_side_car_callback="http://127.0.0.1:8080/cb")
    build(wp_side_car_callback="http://localhost/cb")
    build(wp_side_car_callback="http://wp.internal/cb", allow_insecure_callback="true")


def test_secrets_never_in_repr():
    s = build(openai_api_key="sk-very-secret", wp_server_token="tok-very-secret", side_car_secret="sig-very-secret")
    text = repr(s) + str(s) + str(s.model_dump())
    for secret in ("sk-very-secret", "tok-very-secret", "sig-very-secret"):
        assert secret not in text
    assert set(s.secret_values()) >= {"sk-very-secret", "tok-very-secret", "sig-very-secret"}


def test_transcriber_default_depends_on_openai_configuration(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("TRANSCRIBER", raising=False)
    assert build().transcriber_kind == "local"
    assert build(openai_api_key="sk-x").transcriber_kind == "openai"
    assert build(openai_base_url="http://127.0.0.1:1/v1").transcriber_kind == "openai"


def test_run_problems_list_what_run_needs():
    problems = build(sqs_queue_url="", s3_bucket="", wp_side_car_callback="", wp_server_token="").run_problems()
    assert [p.split(":")[0] for p in problems] == ["SQS_QUEUE_URL", "S3_BUCKET", "WP_SIDE_CAR_CALLBACK",
                                                   "WP_SERVER_TOKEN"]


def test_verbose_json_for_a_model_that_only_replies_json_is_refused_at_start():
    with pytest.raises(ConfigError) as err:
        build(transcribe_model="gpt-4o-transcribe", transcribe_response_format="verbose_json")
    assert any(p.startswith("TRANSCRIBE_RESPONSE_FORMAT: gpt-4o-transcribe replies only json")
               for p in err.value.problems)
    # A compatible server's own model name may be asked for segments.
    assert build(transcribe_model="Systran/faster-whisper-base",
                 transcribe_response_format="verbose_json").transcribe_response_format == "verbose_json"


PROD = {"environment": "prod", "side_car_secret": "prod-signing-secret-0123", "transcriber": "openai",
        "openai_api_key": "sk-prod", "wp_side_car_callback": "https://wp.example.com/wp-json/cb"}


def test_a_complete_prod_configuration_passes():
    assert build(**PROD).signature_required is True


@pytest.mark.parametrize(("change", "line"), [
    ({"require_signature": "false"}, "REQUIRE_SIGNATURE: must not be false when ENVIRONMENT=prod"),
    ({"allow_insecure_callback": "true"}, "ALLOW_INSECURE_CALLBACK: must be false when ENVIRONMENT=prod"),
    ({"wp_side_car_callback": "http://wp.example.com/cb"}, "WP_SIDE_CAR_CALLBACK: https is required when "
                                                           "ENVIRONMENT=prod"),
    # Strictest reading: no plain http in prod, not even to loopback (a dev stand-in's URL left in prod.env).
    ({"wp_side_car_callback": "http://127.0.0.1:8080/cb"}, "WP_SIDE_CAR_CALLBACK: https is required when "
                                                           "ENVIRONMENT=prod"),
    ({"transcriber": ""}, "TRANSCRIBER: required when ENVIRONMENT=prod"),
    ({"transcriber": "openai", "openai_api_key": ""}, "OPENAI_API_KEY: required when TRANSCRIBER=openai"),
    ({"side_car_secret": ""}, "SIDE_CAR_SECRET: required when ENVIRONMENT=prod"),
])
def test_prod_refuses_what_the_readme_forbids(change, line, monkeypatch):
    for var in ("TRANSCRIBER", "OPENAI_API_KEY", "OPENAI_BASE_URL", "REQUIRE_SIGNATURE", "ALLOW_INSECURE_CALLBACK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as err:
        build(**{**PROD, **change})
    assert [p for p in err.value.problems if p.startswith(line)], err.value.problems
    assert len(err.value.problems) == 1, err.value.problems  # one line, for the one variable at fault


def test_field_errors_and_cross_field_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        build(**{**PROD, "concurrency": "0", "metrics_port": "nope", "require_signature": "false",
                 "allow_insecure_callback": "true", "heartbeat_interval": "50", "visibility_timeout": "30"})
    assert [p.split(":")[0] for p in err.value.problems] == [
        "CONCURRENCY", "METRICS_PORT", "REQUIRE_SIGNATURE", "ALLOW_INSECURE_CALLBACK", "HEARTBEAT_INTERVAL"]


@pytest.mark.parametrize(("values", "variable"), [
    ({**PROD, "transcriber": "whisper"}, "TRANSCRIBER"),  # not also "TRANSCRIBER: required" for its default
    ({"retry_base_delay": "-1", "retry_max_delay": "5"}, "RETRY_BASE_DELAY"),  # nor a rule judging the default
])
def test_a_rule_about_an_invalid_field_is_not_reported_twice(values, variable):
    with pytest.raises(ConfigError) as err:
        build(**values)
    assert [p.split(":")[0] for p in err.value.problems] == [variable], err.value.problems


def test_leniently_loaded_settings_keep_what_is_valid():
    settings, problems = load_settings_leniently(env_file=None, s3_bucket="kept", concurrency="0")
    assert settings.s3_bucket == "kept" and settings.concurrency == 4
    assert [p.split(":")[0] for p in problems] == ["CONCURRENCY"]
