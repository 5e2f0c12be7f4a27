"""Progress off a terminal: plain lines at an interval with what, how far, rate and time left (lmforge/progress.py),
checked on a hand-worked clock and through a real command whose stderr is not a terminal."""

from __future__ import annotations

import io

from lmforge import progress as P


def test_lines_say_what_how_far_the_rate_and_the_time_left(monkeypatch):
    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0, 40.0, 40.0, 40.0])  # created; (update, its line) x3; the last line
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = P.LineProgress(total=100, desc="train", unit="step", interval=10, file=out)
    bar.update(25)  # t=10: 25 steps in 10 s -> 2.5 step/s, 75 left -> 30 s
    bar.set_postfix(loss=3.21)
    bar.update(25)  # t=20: 50 in 20 s -> 2.5 step/s, 20 s left
    bar.update(50)  # t=40: done
    bar.close()
    assert out.getvalue().splitlines() == [
        "lmforge: train 25/100 step (25%), 2.5 step/s, 30s left",
        "lmforge: train 50/100 step (50%), 2.5 step/s, 20s left, loss=3.21",
        "lmforge: train 100/100 step (100%), 2.5 step/s, done in 40s, loss=3.21",
    ]


def test_work_shorter_than_the_interval_prints_nothing_and_slow_rates_read_as_seconds_per_unit(monkeypatch):
    out = io.StringIO()
    with P.LineProgress(total=3, desc="judge", unit="item", interval=1e9, file=out) as bar:
        bar.update(1)
    assert out.getvalue() == ""
    clock = iter([0.0, 100.0, 100.0])
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    bar = P.LineProgress(total=4, desc="embed", unit="batch", interval=10, file=out)
    bar.update(2)  # 2 batches in 100 s
    assert out.getvalue() == "lmforge: embed 2/4 batch (50%), 50 s/batch, 1m40s left\n"


def test_a_command_off_a_terminal_reports_progress(tmp_path, monkeypatch, capsys):
    """`lmforge tokenizer train` with stderr captured (not a terminal): its long loops print lines, not bars."""
    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_PROGRESS_INTERVAL", "0")
    corpus = tmp_path / "c.txt"
    corpus.write_text("北京是中国的首都。 The quick brown fox jumps over the lazy dog.\n" * 400, encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmforge: merge ")]
    assert lines and "tok/s" in lines[0] and "%" in lines[0], err
    assert "\r" not in err
