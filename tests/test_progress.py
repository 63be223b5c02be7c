"""surgery.core.progress: a bar on a terminal, one line per stage anywhere else."""

import io

from surgery.cli import main
from surgery.core.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_stage_writes_one_line():
    stream = io.StringIO()
    progress, close = progress_bar("training", stream=stream)
    for step in range(1, 101):
        progress(step, 100, loss=1.0 / step)
    assert stream.getvalue() == ""  # nothing while the stage runs
    close()
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("training: 100/100 steps in ") and text.endswith(", loss 0.0100\n")


def test_a_stage_that_never_progressed_writes_nothing():
    stream = io.StringIO()
    _, close = progress_bar("census", unit="fact", stream=stream)
    close()
    assert stream.getvalue() == ""


def test_on_a_terminal_a_bar_is_drawn():
    stream = Terminal()
    progress, close = progress_bar("training", stream=stream)
    for step in range(1, 4):
        progress(step, 3)
    close()
    assert "\r" in stream.getvalue() and "training" in stream.getvalue()


def test_a_cli_stage_logs_one_line_when_stderr_is_not_a_terminal(tmp_path, capsys):
    from test_census import DEMO_DIR, demo_facts, write_facts

    facts = write_facts(tmp_path / "facts.jsonl", demo_facts())
    assert (
        main(
            [
                "census",
                "--model",
                str(DEMO_DIR),
                "--facts",
                str(facts),
                "--out",
                str(tmp_path / "out"),
                "--batch-size",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "census: 11/11 facts in " in err and err.count("census: ") == 1
