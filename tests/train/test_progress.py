"""The training bar as a log file receives it: where stderr is no terminal (CI, nohup, a scheduler), a line at a
time, not carriage returns."""
import sys

from herd.train.metrics import MetricsLog


def test_a_bar_written_to_a_file_is_lines(tmp_path, monkeypatch):
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        monkeypatch.setattr(sys, "stderr", err)
        metrics = MetricsLog(tmp_path / "run", enabled=True, total_steps=3000, start_step=0, progress=True,
                             tensorboard=False)
        for step in range(1, 3001):
            metrics.log({"step": step, "loss": 2.0, "tokens_per_s": 1000.0})
        metrics.note("a note")
        metrics.close()
    text = log.read_bytes().decode()  # not read_text, whose universal newlines make every "\r" a "\n"
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # the first draw, the note (the bar drawn again after it) and the last: not 3,000 redraws on one line
    assert 3 <= len(lines) <= 6 and all(len(line) <= 100 for line in lines), lines
    assert "a note" in lines and lines[-1].startswith("train: 100%") and "3000/3000" in lines[-1]
