"""tools.show (composites, contact sheets, CLI errors) and tools.curves (with and without matplotlib)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellpaint.data.synthetic_config import SyntheticConfig  # noqa: E402

from cellpaint.data.synthetic import generate  # noqa: E402
from cellpaint.modes import curves as modes_curves  # noqa: E402
from tools import curves, show  # noqa: E402

PROG = "python -m tools.show: error:"
# Which RGB components each channel lights up: w1 blue, w2 green, w3 red, w4 cyan, w5 magenta, w6 yellow.
EXPECTED_COMPONENTS = {1: "B", 2: "G", 3: "R", 4: "GB", 5: "RB", 6: "RG"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tools_data")
    generate(out, SyntheticConfig(train_experiments=(1, 1, 1, 1), test_experiments=(1, 1, 1, 1), classes=8,
                                  positive_controls=2, image_size=24, drop_wells=0.0, seed=1), progress=False)
    return out


def _one_channel_site(channel: int, size: int = 16) -> np.ndarray:
    site = np.zeros((6, size, size), dtype=np.uint8)
    site[channel - 1, 4:12, 4:12] = 200
    return site


def _components(pixel: np.ndarray) -> str:
    return "".join(name for name, v in zip("RGB", pixel) if v > 200)


@pytest.mark.parametrize("channel", range(1, 7))
def test_each_channel_takes_its_colour(channel):
    rgb = show.composite(_one_channel_site(channel))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    inside, outside = rgb[8, 8], rgb[0, 0]
    assert _components(inside) == EXPECTED_COMPONENTS[channel]
    assert inside.max() > 230 and (outside == 0).all()
    dark = [v for name, v in zip("RGB", inside) if name not in EXPECTED_COMPONENTS[channel]]
    assert max(dark) < 50


def test_stretch_is_per_channel_and_blend_additive():
    site = np.zeros((6, 8, 8), dtype=np.uint8)
    site[0, :, 4:] = 40    # a dim Hoechst channel is stretched to full blue ...
    site[2, 4:, :] = 250   # ... as a bright phalloidin channel is to full red
    rgb = show.composite(site).astype(int)
    assert _components(rgb[0, 7]) == "B" and _components(rgb[7, 0]) == "R"
    assert _components(rgb[7, 7]) == "RB"  # both: added (magenta), clipped at 255
    assert rgb.max() <= 255 and (rgb[0, 0] == 0).all()
    flat = show.composite(np.full((6, 8, 8), 3, dtype=np.uint8))
    assert (flat == 0).all()  # nothing to stretch: black, not noise blown up


def _write_one_well_data(root: Path, planes: np.ndarray) -> None:
    """A competition-layout data set with a single train well HEPG2-01_1_B02 whose site 1 is `planes`."""
    folder = root / "train" / "HEPG2-01" / "Plate1"
    folder.mkdir(parents=True)
    for c, plane in enumerate(planes, start=1):
        Image.fromarray(plane).save(folder / f"B02_s1_w{c}.png")
    pd.DataFrame([["HEPG2-01_1_B02", "HEPG2-01", 1, "B02", 0]],
                 columns=["id_code", "experiment", "plate", "well", "sirna"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(columns=["id_code", "experiment", "plate", "well"]).to_csv(root / "test.csv", index=False)
    for name in ("train_controls.csv", "test_controls.csv"):
        pd.DataFrame(columns=["id_code", "experiment", "plate", "well", "sirna", "well_type"]).to_csv(
            root / name, index=False)


def test_site_with_only_w1_bright_is_blue(tmp_path):
    rng = np.random.default_rng(0)
    planes = np.zeros((6, 32, 32), dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    for cy, cx in ((8, 8), (20, 24), (26, 6)):  # three "nuclei"
        planes[0] = np.maximum(planes[0], (180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12)).astype(np.uint8))
    planes[0] += rng.integers(0, 6, (32, 32), dtype=np.uint8)
    _write_one_well_data(tmp_path / "data", planes)
    out = tmp_path / "site.png"
    assert show.main(["--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.size == (4 * 32, 4 * 32)  # default: enlarged 4x to reach 128 px
        rgb = np.asarray(img).astype(float)
    r, g, b = rgb.reshape(-1, 3).mean(axis=0)
    assert b > 3 * max(r, g, 1.0)
    assert rgb[8 * 4, 8 * 4, 2] > 200  # a nucleus centre is bright blue


def test_composite_cli_on_synthetic(data, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert show.main(["--data", str(data), "--id-code", "RPE-01_2_B03", "--site", "2", "--scale", "3",
                      "--out", str(out)]) == 0
    assert "RPE-01_2_B03 site 2" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.size == (72, 72)
        tile = np.asarray(img)
    rgb = show.composite(show.read_site(f"{data}/train/RPE-01/Plate2/B03_s2"))
    assert (tile == np.repeat(np.repeat(rgb, 3, 0), 3, 1)).all()  # nearest-neighbour enlargement, exact
    default = tmp_path / "b.png"
    assert show.main(["--data", str(data), "--out", str(default), "--legend"]) == 0  # first train site
    with Image.open(default) as img:
        assert img.width == 24 * 6 and img.height > 24 * 6  # ceil(128 / 24) = 6, legend below
    assert list(tmp_path.glob(".*.tmp")) == []  # written atomically, nothing left behind


def test_contact_sheet_grid(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sheet.png"
    assert show.main(["--data", str(data), "--contact-sheet", str(out), "--classes", "3", "--wells", "2",
                      "--scale", "2"]) == 0
    assert "(6 tiles)" in capsys.readouterr().out
    assert not (tmp_path / "site.png").exists()  # only the sheet was asked for

    from cellpaint.data import metadata
    table = metadata.load_table(data)
    sheet = show.contact_sheet(table, [0, 1, 2], 2, scale=2)  # the same grid, without the CLI's title line
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.width == sheet.image.width
        pixels = np.asarray(img)
    dy = pixels.shape[0] - sheet.image.height
    assert dy > 0  # the title line(s) on top
    assert len(sheet.boxes) == 3 and all(len(row) == 2 and None not in row for row in sheet.boxes)
    xs = sorted({b[0] for row in sheet.boxes for b in row})
    ys = sorted({b[1] for row in sheet.boxes for b in row})
    assert len(xs) == 2 and len(ys) == 3  # a 3 x 2 grid
    for class_id, row_boxes, codes in zip([0, 1, 2], sheet.boxes, sheet.id_codes):
        assert len(set(codes)) == 2
        for (x0, y0, x1, y1), code in zip(row_boxes, codes):
            assert (x1 - x0, y1 - y0) == (48, 48)
            rec = table[(table["id_code"] == code) & (table["site"] == 1)].iloc[0]
            assert rec["sirna"] == class_id
            rgb = show.composite(show.read_site(rec["image_prefix"]))
            assert (pixels[y0 + dy:y1 + dy, x0:x1] == np.repeat(np.repeat(rgb, 2, 0), 2, 1)).all()

    few = show.contact_sheet(table, [8], 50, scale=1)  # a positive control; fewer wells than asked for
    assert len(few.boxes[0]) == 50 and few.boxes[0][-1] is None and few.boxes[0][0] is not None


@pytest.mark.parametrize("args, message", [
    (["--id-code", "HEPG2-01_1_Z99"], "unknown id_code 'HEPG2-01_1_Z99'"),
    (["--id-code", "NOPE-01_1_B02"], "no experiment 'NOPE-01'"),
    (["--id-code", "HEPG2-01_1_B02", "--site", "7"], "has no site 7"),
    (["--contact-sheet", "{tmp}/x.png", "--class-ids", "3,999"], "class 999 has no labelled wells"),
])
def test_cli_errors_are_one_line(data, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert show.main(["--data", str(data), "--out", str(tmp_path / "s.png")] + args) == 1  # not in the data
    err = capsys.readouterr().err
    assert err.startswith(PROG) and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_argument_errors_are_one_line(data, tmp_path, capsys):
    for args in (["--class-ids", "a,b"], ["--wells", "0"], ["--scale", "-1"]):
        with pytest.raises(SystemExit) as e:
            show.main(["--data", str(data), "--contact-sheet", str(tmp_path / "x.png")] + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err


def test_cli_missing_data_dir_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.show", "--data", str(tmp_path / "nowhere")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(PROG) and "does not exist" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- curves


def _metrics_csv(path: Path, with_validation: bool = True, rows: int = 6) -> Path:
    history = []
    for e in range(rows):
        row = {"epoch": e, "train_loss": 5.0 * 0.6 ** e, "train_acc": min(1.0, 0.15 * e), "lr": 1e-4 * (1 - e / rows)}
        if with_validation:
            row.update(acc=0.1 * e, acc_HEPG2=0.09 * e, acc_HUVEC=0.12 * e)
        row.update(seconds=10.0, pseudo_labels=0 if e < 3 else 20 * (e - 2))
        history.append(row)
    pd.DataFrame(history).to_csv(path, index=False)
    return path


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out" / "run.curves.png"
    assert modes_curves.plot_training_curves(_metrics_csv(tmp_path / "run.metrics.csv"), out) is True
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 400
    # a run on everything (--cv-number -1) has no validation columns: still a picture
    assert modes_curves.plot_training_curves(_metrics_csv(tmp_path / "all.csv", with_validation=False, rows=1),
                                       tmp_path / "all.png") is True
    assert curves.main([str(tmp_path / "run.metrics.csv")]) == 0
    assert (tmp_path / "run.curves.png").is_file()


def test_curves_without_matplotlib(tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "c.png"
    with caplog.at_level("WARNING", logger="cellpaint"):
        assert modes_curves.plot_training_curves(_metrics_csv(tmp_path / "m.csv"), out) is False
    assert not out.exists()
    assert len(caplog.records) == 1 and "matplotlib is not installed" in caplog.records[0].getMessage()


def test_curves_without_rows(tmp_path, caplog):
    csv = tmp_path / "empty.metrics.csv"
    csv.write_text("epoch,train_loss,train_acc,lr,seconds,pseudo_labels\n")
    with caplog.at_level("WARNING", logger="cellpaint"):
        assert modes_curves.plot_training_curves(csv, tmp_path / "e.png") is False
    assert not (tmp_path / "e.png").exists() and len(caplog.records) == 1
    assert curves.main([str(tmp_path / "missing.csv")]) == 1
    assert modes_curves.default_output(Path("r/dn161_0.metrics.csv")) == Path("r/dn161_0.curves.png")
    assert modes_curves.default_output(Path("r/log.csv")) == Path("r/log.png")
