"""Sites into wells: the three ways (summed from a table, grouped as a prediction file keeps them,
summed back from those lists) agree, and all leave out unreadable (NaN) sites."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cellpaint.data.wells import sites_by_well, sum_site_lists, sum_sites


def test_the_three_ways_agree_and_drop_unreadable_sites():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"id_code": ["b", "a", "b", "c", "a", "c"], "site": [1, 1, 2, 1, 2, 2]})
    values = rng.normal(size=(6, 3)).astype(np.float32)
    values[3] = np.nan  # c's first site was unreadable
    wells, sums = sum_sites(rows, values)
    assert wells["id_code"].tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(sums, [values[1] + values[4], values[0] + values[2], values[5]], rtol=1e-6)

    grouped = sites_by_well(rows["id_code"], values)
    assert {k: len(v) for k, v in grouped.items()} == {"b": 2, "a": 2, "c": 1}
    assert all(v.dtype == np.float32 for sites in grouped.values() for v in sites)
    np.testing.assert_array_equal(grouped["b"][1], values[2])  # site order kept

    checked = []
    out = np.empty((3, 3), dtype=np.float32)
    sum_site_lists(grouped, ["a", "b", "c"], out, lambda key, sites: checked.append(key))
    np.testing.assert_allclose(out, sums, rtol=1e-6)
    assert grouped == {} and checked  # emptied as summed; the first well of each shape is checked


def test_a_well_without_a_readable_site_is_left_out():
    rows = pd.DataFrame({"id_code": ["a", "a", "b"]})
    values = np.array([[1.0, 2.0], [np.nan, 0.0], [np.nan, np.nan]], dtype=np.float32)
    wells, sums = sum_sites(rows, values)
    assert wells["id_code"].tolist() == ["a"] and sums.tolist() == [[1.0, 2.0]]
    assert list(sites_by_well(rows["id_code"], values)) == ["a"]
