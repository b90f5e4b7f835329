"""The progress display, seen as a user sees it: a real `python -m netslim train` whose stderr
is a pseudo-terminal (the bar redraws in place with \\r) or a pipe (no bar, the lines only),
and --quiet (nothing but the result)."""
from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios

from test_reliability import ENV, MODEL


def train_argv(data_dir, save, *extra: str) -> list[str]:
    # 8 steps an epoch, a progress event after each (--log-every 1)
    return [sys.executable, "-m", "netslim", "train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
            *MODEL, "--train-subset", "256", "--batch-size", "32", "--epochs", "2", "--seed", "0", "--device", "cpu",
            "--log-every", "1", "--save", str(save), *extra]


def run_with_tty_stderr(argv: list[str]) -> tuple[int, str, str]:
    """Run argv with stderr on a pty (a terminal, as far as the child knows); (code, stdout, stderr)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    chunks: list[bytes] = []
    while True:  # read while it runs: a full pty would block the child
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    out = proc.stdout.read().decode()
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def epoch_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("epoch ") and "| train loss" in ln]


def test_on_a_terminal_the_bar_redraws_in_place(data_dir, tmp_path):
    code, out, err = run_with_tty_stderr(train_argv(data_dir, tmp_path / "run"))
    assert code == 0, err[-2000:]
    assert len(epoch_lines(out)) == 2
    # (the loss appears once a redraw falls 0.1 s after the last: on a fast machine 8 steps may not)
    assert "epoch 1/2" in err and "epoch 2/2" in err and "/8" in err, repr(err[-800:])
    # redrawn in place: carriage returns that start no new line (the pty turns each \n into \r\n)
    redraws = err.replace("\r\n", "\n").count("\r")
    assert redraws >= 4 and err.count("\n") <= 2, repr(err[-800:])


def test_in_a_pipe_there_is_no_bar_only_the_lines(data_dir, tmp_path):
    res = subprocess.run(train_argv(data_dir, tmp_path / "run"), capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(epoch_lines(res.stdout)) == 2
    assert "\r" not in res.stderr and "step" not in res.stderr.replace(" steps ", " "), res.stderr
    assert [ln.split(" ")[0] for ln in res.stderr.splitlines()] == ["training"]  # the start line alone


def test_quiet_shows_no_progress_even_on_a_terminal(data_dir, tmp_path):
    code, out, err = run_with_tty_stderr(train_argv(data_dir, tmp_path / "run", "--quiet"))
    assert code == 0, err[-2000:]
    assert err == "" and epoch_lines(out) == []
    assert out.splitlines()[-1].startswith("done: best top-1")
