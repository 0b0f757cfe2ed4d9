"""Progress in a log file (issue 30): a bar writes a few whole lines, not carriage-return updates."""
import io

from merlin_molar.progress import LINES_PER_RUN, progress_bar


def test_a_bar_in_a_log_file_writes_a_line_per_tenth(monkeypatch):
    monkeypatch.setattr("merlin_molar.progress.interactive", lambda: False)
    log = io.StringIO()
    with progress_bar(total=4344, desc="embed items", unit="item", file=log) as bar:
        for _ in range(4344 // 32):  # a batch of 32 at a time, as embed-items updates it
            bar.update(32)
        bar.update(4344 % 32)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert LINES_PER_RUN <= len(lines) <= LINES_PER_RUN + 3, lines
    assert len(set(lines)) == len(lines) and "4344/4344" in lines[-1]


def test_a_bar_over_an_iterable_in_a_log_file_writes_whole_lines(monkeypatch):
    monkeypatch.setattr("merlin_molar.progress.interactive", lambda: False)
    log = io.StringIO()
    starts = range(0, 6040, 256)  # the cold-start evaluation's batches
    assert list(progress_bar(len(starts), iterable=starts, desc="cold-start eval", file=log)) == list(starts)
    lines = log.getvalue().splitlines()
    # a line every 24 // LINES_PER_RUN = 2 batches, plus the first and the last: whole lines, each once
    assert "\r" not in log.getvalue() and len(lines) == len(set(lines)) <= 24 // 2 + 2 and "24/24" in lines[-1]
