"""Outputs have an owner (issue 20): a run's id is in SAVE.args.json and every checkpoint; a new run
refuses a --save that holds another run's files (--overwrite removes them first, never mixing two
runs); --resume continues under the run's own prefix and never writes over the checkpoint it reads;
no command writes over one of its own inputs. Each refusal: its exit status, one line naming the
culprit, and every earlier file byte for byte as it was."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import make_submission
from cellpaint.core import outputs
from cellpaint.core.errors import OutputError
from cellpaint.engine import run_owner
from tests.conftest import SMALL, run

WHERE = ["--device", "cpu", "--num-data-workers", "0"]


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_run(trained: Path, to: Path, epochs=(0, 1)) -> Path:
    """The files of the `trained` fixture's run (2 epochs) under `to`/net."""
    to.mkdir(parents=True, exist_ok=True)
    names = ["", ".args.json", ".log", ".metrics.csv", *(f".{k}" for k in epochs)]
    for suffix in names:
        shutil.copy2(f"{trained}{suffix}", to / f"net{suffix}")
    return to / "net"


def test_every_checkpoint_and_the_settings_carry_the_run_id(trained):
    run_id = json.loads(Path(f"{trained}.args.json").read_text())["run_id"]
    assert len(run_id) == 32
    for path in (trained, f"{trained}.0", f"{trained}.1"):
        assert torch.load(path, weights_only=True)["run_id"] == run_id


def test_run_files_lists_what_a_run_writes(tmp_path):
    for name in ("net", "net.0", "net.12", "net.log", "net.metrics.csv", "net.curves.png", "net.args.json",
                 "net.lock", "net.12.output", "net.12.output_tta.log", "net.3.embeddings_x", "net2.0", "netx",
                 "net.v2.0", "other"):
        (tmp_path / name).write_text("x")
    files = outputs.run_files(tmp_path / "net")
    assert [p.name for p in files.checkpoints] == ["net", "net.0", "net.12"]
    assert sorted(p.name for p in files.records) == ["net.args.json", "net.curves.png", "net.log", "net.metrics.csv"]
    assert sorted(p.name for p in files.made_from) == ["net.12.output", "net.12.output_tta.log", "net.3.embeddings_x"]
    assert files.summary(limit=20).startswith("net, 2 epoch checkpoints net.0..net.12, net.args.json")
    assert outputs.run_files(tmp_path / "absent" / "net").all == []


def test_a_second_run_on_a_finished_runs_save_is_refused(trained, tiny_competition, tmp_path, caplog):
    """Issue 20, lost work 1: another --lr on the same --save would have replaced net, net.0, the log,
    the metrics and the settings, and left the old epochs beside the new ones."""
    save = copy_run(trained, tmp_path)
    before = snapshot(tmp_path)
    assert run("--data", tiny_competition[0], "--save", save, "-e", 3, "--lr", "const,1e-3", *SMALL) == 1
    (line,) = errors_of(caplog)
    assert line == (f"--save {save} holds another run's files (net, net.0..net.1, net.args.json, net.log, "
                    "net.metrics.csv); choose another --save, or add --overwrite to remove them first")
    assert snapshot(tmp_path) == before  # nothing written, not even the log


def test_overwrite_removes_the_earlier_run_first(trained, tiny_competition, tmp_path, caplog):
    save = copy_run(trained, tmp_path)
    (tmp_path / "net.1.output").write_bytes(b"predictions of the old net.1")
    (tmp_path / "keep.txt").write_text("not the run's")
    old_id = json.loads(Path(f"{save}.args.json").read_text())["run_id"]
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", -1, "--overwrite", *SMALL) == 0
    # net.1 and the prediction made from it are gone: no file of the old run stays beside the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "net", "net.0", "net.args.json", "net.log",
                                                         "net.metrics.csv"]
    new_id = json.loads(Path(f"{save}.args.json").read_text())["run_id"]
    assert new_id != old_id and torch.load(f"{save}.0", weights_only=True)["run_id"] == new_id
    log = Path(f"{save}.log").read_text()
    assert "--overwrite: removed the 7 file(s) of the earlier run at" in log and "net.1.output" in log


def test_overwrite_never_removes_what_the_run_reads(trained, tiny_competition, tmp_path, caplog):
    save = copy_run(trained, tmp_path)
    before = snapshot(tmp_path)
    assert run("--data", tiny_competition[0], "--save", save, "--load", f"{save}.1", "--overwrite", "-e", 1,
               *WHERE) == 2
    (line,) = errors_of(caplog)
    assert line.startswith(f"--overwrite would remove {save}.1, which this run reads (--load)")
    assert snapshot(tmp_path) == before


def test_resume_never_saves_over_the_checkpoint_it_reads(trained, tiny_competition, tmp_path, caplog):
    """Issue 20, lost work 2: `cp net.0 backup/backup.pt; --resume backup/backup.pt` continued the run
    as backup/backup.pt.<epoch> and saved its best checkpoint as backup.pt itself. The run's own prefix
    (the trained fixture's, named by the checkpoint) already holds epoch 1: that is refused too."""
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy2(f"{trained}.0", backup / "backup.pt")
    run_dir = snapshot(trained.parent)
    assert run("--data", tiny_competition[0], "--resume", backup / "backup.pt", *WHERE) == 1
    (line,) = errors_of(caplog)
    assert line == (f"--resume {backup / 'backup.pt'}: {backup / 'backup.pt'} would be replaced by the continued "
                    f"run's best checkpoint; {trained} already holds epoch 1 of this run, after "
                    f"{backup / 'backup.pt'}'s epoch 0: resume the newest, {trained}.1; give --save PREFIX to "
                    "continue the run there")
    assert snapshot(backup) == {"backup.pt": Path(f"{trained}.0").read_bytes()}
    assert {k: v for k, v in snapshot(trained.parent).items() if k in run_dir} == run_dir


def test_resume_of_a_best_checkpoint_names_its_epoch_file(trained, tiny_competition, tmp_path, caplog):
    save = copy_run(trained, tmp_path, epochs=(0,))
    shutil.copy2(f"{trained}.0", save)  # the best was epoch 0
    before = snapshot(tmp_path)
    epoch = torch.load(save, weights_only=True)["epoch"]
    assert run("--data", tiny_competition[0], "--resume", save, *WHERE) == 1
    (line,) = errors_of(caplog)
    assert f"{save} would be replaced by the continued run's best checkpoint (resume the epoch checkpoint " \
           f"{save}.{epoch} instead: the same epoch)" in line
    assert snapshot(tmp_path) == before


def test_resume_into_another_runs_prefix_is_refused(trained, tiny_competition, tmp_path, caplog):
    theirs = copy_run(trained, tmp_path / "theirs")
    other = json.loads(Path(f"{theirs}.args.json").read_text())
    Path(f"{theirs}.args.json").write_text(json.dumps({**other, "run_id": "another"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy2(f"{trained}.0", mine / "net.0")
    before = snapshot(tmp_path / "theirs")
    assert run("--data", tiny_competition[0], "--resume", mine / "net.0", "--save", theirs, *WHERE) == 1
    (line,) = errors_of(caplog)
    assert f"{theirs} holds the files of another run (net, net.0..net.1" in line
    assert snapshot(tmp_path / "theirs") == before and sorted(p.name for p in mine.iterdir()) == ["net.0"]


def test_resume_of_a_finished_run_says_how_to_train_on(trained, tiny_competition, tmp_path, capsys):
    save = copy_run(trained, tmp_path)
    before = snapshot(tmp_path)
    assert run("--data", tiny_competition[0], "--resume", f"{save}.1", *WHERE) == 2
    assert (f"--resume {save}.1: its run already did all its 2 epochs; to train on, start a new run from it: "
            f"--load {save}.1 --start-epoch 2") in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_run_that_saved_no_checkpoint_is_taken_over(tmp_path):
    (tmp_path / "net.log").write_text("failed before its first epoch\n")
    (tmp_path / "net.args.json").write_text("{}")
    note = run_owner.claim(str(tmp_path / "net"), "new", None, False, {}, 2, 0)
    assert note == f"--save {tmp_path / 'net'}: replacing net.args.json, net.log, left by a run that saved no checkpoint"
    (tmp_path / "net.metrics.csv").write_text("epoch\n0\n")
    with pytest.raises(OutputError, match="holds another run's files"):
        run_owner.claim(str(tmp_path / "net"), "new", None, False, {}, 2, 0)


def test_make_submission_never_writes_over_its_input(tmp_path, capsys):
    """Issue 20, lost work 3: `make_submission.py -o p.output p.output` replaced the prediction file by
    the CSV. Refused before anything is read; the same for a metadata file of --data and a hard link."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_text("site_id\n")
    predictions = tmp_path / "p.output"
    predictions.write_bytes(b"a prediction file")
    (tmp_path / "link.csv").hardlink_to(predictions)
    for output, what in ((predictions, "a prediction file"), (data / "metadata.csv", "the metadata of --data"),
                         (tmp_path / "link.csv", "a prediction file")):
        assert make_submission.main(["--data", str(data), "-o", str(output), str(predictions)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"would write {output}" in err and f"over its own input ({what})" in err
    assert predictions.read_bytes() == b"a prediction file" and (data / "metadata.csv").read_text() == "site_id\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link.csv", "p.output"]


def test_merge_predictions_never_writes_over_its_input(tmp_path, capsys):
    from tools import merge_predictions

    a = tmp_path / "a.output"
    a.write_bytes(b"a prediction file")
    assert merge_predictions.main(["-o", str(a), str(a)]) == 1
    assert "over its own input (a file to merge)" in capsys.readouterr().err and a.read_bytes() == b"a prediction file"


def test_the_demo_replaces_only_its_own_earlier_run(tmp_path):
    import demo

    save, data = tmp_path / "net", tmp_path / "data"
    assert not demo.earlier_demo_run(save, data)
    Path(f"{save}.args.json").write_text(json.dumps({"data": {"root": str(data)}, "model": {"backbone": "smallcnn"}}))
    assert demo.earlier_demo_run(save, data)
    assert not demo.earlier_demo_run(save, tmp_path / "other")


def test_a_run_made_before_run_ids_resumes_at_its_prefix(trained, tmp_path):
    """A checkpoint and args.json without ids (made before them) are one run: --resume continues it
    there (and it gets an id from then on); a new run still refuses the prefix."""
    save = copy_run(trained, tmp_path, epochs=(0,))
    for path in (save, Path(f"{save}.0")):
        state = torch.load(path, weights_only=True)
        del state["run_id"]
        torch.save(state, path)
    settings = json.loads(Path(f"{save}.args.json").read_text())
    del settings["run_id"]
    Path(f"{save}.args.json").write_text(json.dumps(settings))
    state = torch.load(f"{save}.0", weights_only=True)
    assert run_owner.resume_prefix(f"{save}.0", state, None) == str(save)
    assert run_owner.claim(str(save), "new id", {"path": f"{save}.0", "state": state}, False, {}, 2, 0) is None
    with pytest.raises(OutputError, match="holds another run's files"):
        run_owner.claim(str(save), "new id", None, False, {}, 2, 0)
