"""Exit codes of `streamlstm`: user errors are one line, bugs keep their traceback.

2: the command cannot run as given (a setting, a flag, an input file or a checkpoint);
1: it started and failed outside itself (the embedded broker); anything else propagates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlstm.cli import main


def _csv(path: Path) -> Path:
    path.write_text("t,a,b\n1,1,2\n2,2,3\n3,3,4\n")
    return path


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_an_unexpected_value_error_is_a_bug_and_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamlstm.offline.backtest as backtest

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(backtest, "replay", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["replay", str(_csv(tmp_path / "d.csv")), "-o", str(tmp_path / "o"), "--no-progress"])


def test_a_bad_setting_in_a_command_is_exit_2_and_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(_csv(tmp_path / "d.csv")), "--set", "model.hidden_size=0"])
    assert code == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("streamlstm: config error:") and "model.hidden_size" in line


@pytest.mark.parametrize("command", ["replay", "pretrain"])
def test_a_missing_input_file_is_exit_2_and_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    args = [command, str(missing), "--checkpoint-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(args) == 2
    (line,) = _err_lines(capsys)
    assert line == f"streamlstm: {missing}: cannot read it (No such file or directory)"


def test_an_unknown_file_format_is_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.txt"
    path.write_text("1,2\n")
    assert main(["replay", str(path)]) == 2
    (line,) = _err_lines(capsys)
    assert "unknown format '.txt'" in line


def test_produce_reads_its_file_before_it_connects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 has no broker: the file error must come first, and at once.
    missing = tmp_path / "nope.jsonl"
    assert main(["produce", str(missing), "--bootstrap", "127.0.0.1:1", "--no-progress"]) == 2
    assert "cannot read it" in _err_lines(capsys)[-1]


def test_a_broker_that_cannot_start_is_exit_1_and_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import streamlstm.devtools.broker as broker
    from streamlstm.devtools.tansu import BrokerError

    def taken(port: int | None = None) -> None:
        raise BrokerError(f"port {port} on 127.0.0.1 is already in use")

    monkeypatch.setattr(broker, "run_foreground", taken)
    assert main(["broker", "--port", "9092"]) == 1
    assert _err_lines(capsys)[-1] == "streamlstm: port 9092 on 127.0.0.1 is already in use"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay"])
    assert exit_.value.code == 2
    assert "the following arguments are required: input" in capsys.readouterr().err


def test_the_command_line_loads_no_torch_kafka_or_devtools_until_a_command_runs() -> None:
    # `streamlstm --help` stays fast: torch alone takes seconds to import.
    import subprocess
    import sys

    code = (
        "import sys; from streamlstm.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kafka') "
        "or m.startswith('streamlstm.devtools')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
