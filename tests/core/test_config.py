"""Settings: defaults, precedence (file < env < --set), and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamlstm.cli import main
from streamlstm.config import ConfigError, load_settings


def test_defaults_are_the_documented_contract() -> None:
    s = load_settings()
    assert s.model.input_size is None
    assert (s.model.hidden_size, s.model.num_layers, s.model.cell) == (64, 2, "lstm")
    assert s.engine.torch_threads == 1
    assert s.training.enabled is True
    for section in ("kafka", "model", "engine", "state", "training", "drift", "metrics"):
        assert hasattr(s, section)


def test_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[model]\nhidden_size = 16\nnum_layers = 3\n[engine]\nmax_batch = 7\n")
    monkeypatch.setenv("STREAMLSTM_MODEL__HIDDEN_SIZE", "20")
    monkeypatch.setenv("STREAMLSTM_ENGINE__MAX_BATCH", "9")
    s = load_settings(config, {"engine.max_batch": "11"})
    assert s.model.num_layers == 3  # file
    assert s.model.hidden_size == 20  # env beats file
    assert s.engine.max_batch == 11  # --set beats env


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model.hidden_size": "-3"}, "model.hidden_size"),
        ({"model.num_layers": "two"}, "model.num_layers"),
        ({"model.cell": "rnn"}, "model.cell"),
        ({"engine.torch_threads": "0"}, "engine.torch_threads"),
        ({"state.max_keys": "1.5"}, "state.max_keys"),
        ({"model.hiden_size": "3"}, "model.hiden_size"),
        ({"kafka.client": "librdkafka"}, "kafka.client"),
    ],
)
def test_bad_value_names_the_field(override: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=override)
    message = str(info.value)
    assert message.startswith(field + ":")
    assert "\n" not in message


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[model]\nhidden = 3\n")
    with pytest.raises(ConfigError, match=r"^model\.hidden: unknown setting"):
        load_settings(config)
    config.write_text("[modle]\nhidden_size = 3\n")
    with pytest.raises(ConfigError, match=r"^modle: unknown setting"):
        load_settings(config)


def test_unknown_env_variable_in_a_section_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMLSTM_MODEL__HIDEN_SIZE", "3")
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        load_settings()


def test_cli_bad_config_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "model.hidden_size=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "model.hidden_size" in err[0] and "greater than or equal to 1" in err[0]


def test_process_exit_code_is_2_for_a_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[engine]\nmax_batch = "lots"\n')
    done = subprocess.run(
        [sys.executable, "-m", "streamlstm.cli", "config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "engine.max_batch" in done.stderr


@pytest.mark.parametrize(
    ("override", "field"),
    [
        # kafka-python: fetch_max_wait_ms < request_timeout_ms (30000, not overridden)
        ({"kafka.fetch_max_wait_ms": "30000"}, "kafka.fetch_max_wait_ms"),
        # kafka-python: heartbeat interval below the session timeout
        (
            {"kafka.heartbeat_interval_ms": "10000", "kafka.session_timeout_ms": "10000"},
            "kafka.heartbeat_interval_ms",
        ),
        ({"kafka.output_topic": "events"}, "kafka.output_topic"),
        ({"kafka.dead_letter_topic": "events"}, "kafka.dead_letter_topic"),
        ({"kafka.dead_letter_topic": "predictions"}, "kafka.dead_letter_topic"),
        ({"kafka.security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism"),
        (
            {"kafka.security_protocol": "SASL_PLAINTEXT", "kafka.sasl_mechanism": "PLAIN"},
            "kafka.sasl_username",
        ),
        (
            {
                "kafka.security_protocol": "SASL_PLAINTEXT",
                "kafka.sasl_mechanism": "SCRAM-SHA-256",
                "kafka.sasl_username": "u",
            },
            "kafka.sasl_password",
        ),
        (
            {
                "kafka.security_protocol": "SASL_SSL",
                "kafka.sasl_mechanism": "OAUTHBEARER",
                "kafka.sasl_username": "u",
                "kafka.sasl_password": "p",
            },
            "kafka.sasl_mechanism",
        ),
        ({"kafka.sasl_username": "u"}, "kafka.sasl_username"),
        ({"kafka.sasl_password": "p"}, "kafka.sasl_password"),
        (
            {"kafka.security_protocol": "SSL", "kafka.sasl_mechanism": "PLAIN"},
            "kafka.sasl_mechanism",
        ),
        ({"kafka.ssl_cafile": __file__}, "kafka.ssl_cafile"),
        (
            {"kafka.security_protocol": "SSL", "kafka.ssl_cafile": "/nonexistent/ca.pem"},
            "kafka.ssl_cafile",
        ),
        ({"kafka.security_protocol": "SSL", "kafka.ssl_keyfile": __file__}, "kafka.ssl_certfile"),
        ({"kafka.producer_acks": "0"}, "kafka.producer_acks"),
        ({"kafka.bootstrap_servers": ""}, "kafka.bootstrap_servers"),
        ({"kafka.bootstrap_servers": "a:9092,,b:9092"}, "kafka.bootstrap_servers"),
        ({"kafka.bootstrap_servers": "a:port"}, "kafka.bootstrap_servers"),
        ({"kafka.bootstrap_servers": "a:70000"}, "kafka.bootstrap_servers"),
        ({"training.burn_in": "64"}, "training.burn_in"),
        ({"engine.max_batch": "20", "state.max_keys": "10"}, "engine.max_batch"),
    ],
)
def test_bad_combination_names_the_field(override: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=override)
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert "\n" not in message


def test_good_combinations_are_accepted() -> None:
    s = load_settings(overrides={"kafka.producer_acks": "0", "kafka.allow_unsafe_acks": "true"})
    assert s.kafka.producer_acks == "0"
    s = load_settings(
        overrides={
            "kafka.security_protocol": "SASL_SSL",
            "kafka.sasl_mechanism": "SCRAM-SHA-512",
            "kafka.sasl_username": "u",
            "kafka.sasl_password": "p",
            "kafka.ssl_cafile": __file__,
            "kafka.fetch_max_wait_ms": "29999",
        }
    )
    assert s.kafka.client_kwargs()["sasl_plain_password"] == "p"
    assert load_settings(overrides={"kafka.producer_acks": "1"}).kafka.producer_acks == "1"
    servers = "kafka-1:9092, kafka-2 ,[::1]:9093,10.0.0.1:19092"
    assert load_settings(overrides={"kafka.bootstrap_servers": servers})


def test_missing_codec_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "zstandard" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"^kafka\.compression_type: zstd needs"):
        load_settings(overrides={"kafka.compression_type": "zstd"})


def test_confluent_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "confluent_kafka" else real(name, *a),
    )
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"kafka.client": "confluent"})
    message = str(info.value)
    assert message.startswith("kafka.client: ") and "\n" not in message
    assert "pip install 'streamlstm[confluent]'" in message
    assert load_settings().kafka.client == "kafka-python"  # the default needs nothing


def test_run_with_a_bad_combination_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamlstm.cli", "run", "--set", "kafka.output_topic=events"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "kafka.output_topic" in done.stderr, done.stderr
