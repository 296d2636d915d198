"""What a cache was built from: a fingerprint of each plate's image files, so that a cache can tell
when the images under it changed (regenerated in place, a PNG restored or replaced).

A plate's fingerprint hashes, for every image file of each of its sites (a PNG per channel, or one
composite PNG), the file's name, size and modification time (nanoseconds) — what `make` and
`rsync` judge a file by: one `stat` per file, no reading (measured in benchmarks/RESULTS.md "cache fingerprints"). A file whose content
changed with its size and time kept (a copy with `cp -p` or `rsync -t` of other pixels) passes
unseen; a content hash would see it, at the cost of reading every image.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

import pandas as pd

from cellpaint.data.images import SiteFiles


def plate_key(experiment: str, plate: int) -> str:
    return f"{experiment}/Plate{plate}"


@dataclass(frozen=True)
class PlateSources:
    digest: str    # of (name, size, mtime) of every channel PNG of the plate's sites
    present: int   # how many of its PNGs are there now (0: the images are not on this machine)


def plate_sources(table: pd.DataFrame, files: SiteFiles) -> dict[str, PlateSources]:
    """The fingerprint of each plate of the site table `table` (its `image_prefix` column), over the
    image files of each site as `files` names them (a PNG per channel, or one composite)."""
    out: dict[str, PlateSources] = {}
    for (experiment, plate), rows in table.groupby(["experiment", "plate"], sort=False):
        h = hashlib.sha256()
        present = 0
        for prefix in sorted(rows["image_prefix"]):
            for path in files.paths(prefix):
                try:
                    st = os.stat(path)
                    entry = f"{st.st_size}:{st.st_mtime_ns}:{stat.S_IFMT(st.st_mode)}"
                    present += 1
                except OSError:
                    entry = "missing"
                h.update(f"{os.path.basename(path)}={entry}\n".encode())
        out[plate_key(str(experiment), int(plate))] = PlateSources(h.hexdigest()[:20], present)
    return out


def changed(recorded: dict, current: dict[str, PlateSources]) -> list[str]:
    """The plates of `current` whose recorded digest (plate -> digest) differs or is missing, leaving
    out plates none of whose images are here now (a cache used where only the cache was copied)."""
    return [key for key, now in current.items() if now.present and recorded.get(key) != now.digest]
