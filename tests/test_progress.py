"""The one progress-bar rule: bars only when progress is on AND stderr is a terminal."""
import io
import sys

from m2ib.core.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def drawn(monkeypatch, stream, enabled) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress_bar(range(3), desc="step", enabled=enabled)) == [0, 1, 2]   # iterates either way
    return stream.getvalue()


def test_a_bar_is_drawn_on_a_terminal_only_when_enabled(monkeypatch):
    assert "step" in drawn(monkeypatch, Terminal(), enabled=True)
    assert drawn(monkeypatch, Terminal(), enabled=False) == ""
    assert drawn(monkeypatch, io.StringIO(), enabled=True) == ""      # a log file, CI, a notebook
