"""A log holds plain lines whatever the terminal shows: bars draw on the terminal alone."""

import io

from segnest.runtime import console
from segnest.runtime.console import ConsoleLog


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_leaves_plain_progress_lines_in_the_log(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    monkeypatch.setattr(console, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    log = ConsoleLog(tmp_path / "train.log").open()
    try:
        for _ in console.progress_bar(range(20), desc="eval", leave=False):
            pass
        print("val mIoU 50.00")
    finally:
        log.close()
    text = (tmp_path / "train.log").read_text()
    lines = text.splitlines()
    assert lines[0] == "eval: 2/20 (10%)" and lines[-2] == "eval: 20/20 (100%)"
    assert lines[-1] == "val mIoU 50.00" and len(lines) == 11
    assert "|" not in text and "\r" not in text  # no bar frame reached the log
    assert "eval:" in terminal.getvalue() and "%|" in terminal.getvalue()  # the bar was shown


def test_without_a_log_a_terminal_gets_the_bar_alone(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with console.progress_bar(total=4, desc="predict") as bar:
        bar.update(4)
    assert "predict: 100%" in terminal.getvalue()
    assert "4/4 (100%)" not in terminal.getvalue()
