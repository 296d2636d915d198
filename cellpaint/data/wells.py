"""Sites into wells: the one place where the per-site vectors of a well (logits, embeddings) are
put together. The trainer's validation and pseudo-labels sum them (`sum_sites`); a prediction
file keeps them per site, grouped by well (`sites_by_well`), and its reader sums them back
(`add_sites`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def sum_sites(rows: pd.DataFrame, site_values: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Sum per-site vectors over the sites of each well: (one row per well, [wells, K] sums).

    Sites whose vector is not finite (NaN: an unreadable image skipped) are left out, and so is a
    well with no site left."""
    finite = np.isfinite(site_values).all(axis=1) if len(site_values) else np.ones(0, dtype=bool)
    if not finite.all():
        rows, site_values = rows[finite], site_values[finite]
    codes, first, inverse = np.unique(rows["id_code"].to_numpy(), return_index=True, return_inverse=True)
    sums = np.zeros((len(codes), site_values.shape[1]), dtype=np.float32)
    np.add.at(sums, inverse, site_values)
    return rows.iloc[first].reset_index(drop=True), sums


def sites_by_well(ids: Iterable[str], site_values: np.ndarray) -> dict[str, list[np.ndarray]]:
    """The per-site vectors of each well as a prediction file keeps them: id_code -> [float32
    vector per site], in site order. Sites whose vector is not finite are left out, as in
    `sum_sites`, and so is a well with no site left."""
    wells: dict[str, list[np.ndarray]] = {}
    for code, vector in zip(ids, site_values):
        if np.isfinite(vector).all():  # NaN: a site skipped as unreadable (--skip-bad-images)
            wells.setdefault(code, []).append(vector.astype(np.float32))
    return wells


def sum_site_lists(wells: dict, keys: list[str], out: np.ndarray,
                   check: Callable[[str, object], object]) -> None:
    """Fill `out` with the float32 sums of the site lists of `wells` (as `sites_by_well` makes
    them) in the order of `keys`, emptying `wells`.

    One pass, one numpy call per well: wells are popped so their per-site arrays are freed as
    the sums fill up. A full-size file has ~50,000 site vectors, so the common case (a list of
    two arrays of the known shape and dtype object, which the pickle shares between all arrays)
    is tested inline; anything else goes through `check(key, sites)`, which raises with a precise
    message or passes an unusual but valid entry (a tuple, one site, another numeric dtype).
    """
    n_classes = out.shape[1]
    shape = (n_classes,)
    ndarray, add, known = np.ndarray, np.add, None
    with np.errstate(over="raise"):  # finite values too large for a float32 sum: the caller names the well
        for i, key in enumerate(keys):
            try:
                known = _sum_well(wells.pop(key), out[i], shape, known, key, check, add, ndarray)
            except FloatingPointError:
                raise OverflowError(key) from None


def _sum_well(sites, row: np.ndarray, shape: tuple, known, key: str, check, add, ndarray):
    """One well of `sum_site_lists`; returns the dtype known to be fine."""
    if type(sites) is list and len(sites) == 2:
        a, b = sites
        if (type(a) is ndarray and type(b) is ndarray and a.dtype is known and b.dtype is known
                and a.shape == shape and b.shape == shape):
            add(a, b, row)
            return known
    check(key, sites)
    np.copyto(row, sites[0], casting="same_kind")
    for site in sites[1:]:
        add(row, site, out=row)
    return sites[0].dtype
