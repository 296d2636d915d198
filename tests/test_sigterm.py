"""SIGTERM (what schedulers and `docker stop` send) is treated like Ctrl-C (issue 20): a real process of
train, predict and make_submission, terminated while it works, ends with exit status 143 and one line
(train: the --resume command), and every file written before is intact. Each signal is sent once the
command's own handler is installed (read off /proc: the SigCgt mask), so no test races the start."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SMALL
from tests.test_submission import make

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask off /proc")


def handles_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM installed (cli/entry.py does, while a command runs)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, limit: float = 600) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "the command ended before it could be terminated"


def terminate_group(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGTERM)  # a scheduler's SIGTERM reaches the loader workers too
    return proc.communicate(timeout=300)


def test_sigterm_in_training_says_how_to_resume(tiny_competition, tmp_path):
    save = tmp_path / "net"
    proc = start([ROOT / "main.py", "--data", tiny_competition[0], "--save", save, "-e", 3, "--cv-number", -1,
                  *SMALL, "--num-data-workers", 2, "--disp-batches", 1])
    log = tmp_path / "net.log"
    wait_for(proc, lambda: log.exists() and "epoch 1 batch 2/" in log.read_text())
    first = Path(f"{save}.0").read_bytes()
    out, err = terminate_group(proc)
    assert proc.returncode == 143, err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and errors[0].endswith(f"ERROR: interrupted in epoch 1; continue with --resume {save}.0")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Terminated" not in err
    assert Path(f"{save}.0").read_bytes() == first and torch.load(f"{save}.0", weights_only=True)["epoch"] == 0
    assert not Path(f"{save}.1").exists()


def test_sigterm_in_predict_keeps_the_earlier_prediction(trained, tiny_competition, tmp_path):
    checkpoint = tmp_path / "net.1"
    shutil.copy2(f"{trained}.1", checkpoint)
    output = Path(f"{checkpoint}.output")
    output.write_bytes(b"an earlier prediction")
    # --tta-random: many passes of inference, so that it is still working when the signal comes
    proc = start([ROOT / "main.py", "--mode", "predict", "--data", tiny_competition[0], "--load", checkpoint,
                  "--tta-random", 200, "--device", "cpu", "--num-data-workers", 0])
    partial = Path(f"{output}.log.partial")
    wait_for(proc, lambda: handles_sigterm(proc.pid) and partial.exists() and "data " in partial.read_text())
    _, err = terminate_group(proc)
    assert proc.returncode == 143, err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert errors and errors[0].endswith("interrupted: --mode predict wrote nothing; run the same command again")
    assert len(errors) == 1 and "Traceback" not in err
    assert output.read_bytes() == b"an earlier prediction"


def test_sigterm_in_make_submission_keeps_the_earlier_csv(tmp_path):
    info = make(tmp_path, files=1)
    files = [info["files"][0]]
    for k in range(40):  # enough reading that the signal finds it at work
        files.append(tmp_path / f"copy_{k}.output")
        shutil.copy2(info["files"][0], files[-1])
    out = tmp_path / "sub.csv"
    out.write_text("id_code,sirna\nearlier,1\n")
    proc = start([ROOT / "make_submission.py", "--data", info["data"], "-o", out, *files])
    wait_for(proc, lambda: handles_sigterm(proc.pid))
    _, err = terminate_group(proc)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert out.read_text() == "id_code,sirna\nearlier,1\n" and not Path(f"{out}.json").exists()


def raised_in(filename: str, error: BaseException):
    """sys.exc_info() of `error` raised by code compiled under `filename`."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except BaseException:
        return sys.exc_info()


def test_a_worker_is_silent_only_about_a_hand_over_the_main_process_broke(capsys):
    from cellpaint.engine.data import _quiet_when_main_stops

    _quiet_when_main_stops(*raised_in("/usr/lib/python3/multiprocessing/resource_sharer.py", EOFError()))
    _quiet_when_main_stops(*raised_in("/usr/lib/python3/multiprocessing/resource_sharer.py",
                                      ConnectionResetError()))
    assert capsys.readouterr().err == ""
    _quiet_when_main_stops(*raised_in("/usr/lib/python3/multiprocessing/resource_sharer.py", ValueError("other")))
    _quiet_when_main_stops(*raised_in("dataset.py", EOFError("elsewhere")))
    err = capsys.readouterr().err
    assert "ValueError: other" in err and "EOFError: elsewhere" in err and err.count("Traceback") == 2
