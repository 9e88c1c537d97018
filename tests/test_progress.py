"""Progress in a log: plain lines where Rich would draw nothing until the end."""

import io

from rich.console import Console
from rich.progress import Progress, TextColumn

from lpm.progress import LineProgress, progress_bar
from tests.test_cli import lpm


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_terminal_gets_rich_and_a_log_gets_lines():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    log = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(progress_bar(TextColumn("{task.description}"), console=terminal), Progress)
    assert isinstance(progress_bar(TextColumn("{task.description}"), console=log), LineProgress)


def test_lines_at_start_every_interval_and_at_completion():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(Console(file=out, width=200), every=30.0, clock=clock)
    with bar:
        task = bar.add_task("covid · fit", total=4, loss="")
        clock.now = 10.0
        bar.update(task, completed=1, loss="0.5000")  # within 30 s of the last line: quiet
        clock.now = 45.0
        bar.update(task, completed=2, loss="0.2500")
        clock.now = 50.0
        bar.update(task, advance=2, loss="0.1250")  # complete: a line at once
        bar.update(task, completed=4)  # complete again: nothing more
    lines = out.getvalue().splitlines()
    assert lines == [
        "covid · fit: 0/4 [0:00]",
        "covid · fit: 2/4 loss 0.2500 [0:45]",
        "covid · fit: 4/4 loss 0.1250 [0:50]",
    ]


def test_a_run_without_a_terminal_reports_its_progress(tmp_path):
    res = lpm("run", "covid", "-n", "2000", "--weeks", "2", "-o", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "covid · heuristic · 2,000 agents: 14/14 days" in res.stderr, res.stderr
