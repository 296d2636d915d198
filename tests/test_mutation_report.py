"""The mutation report (benchmarks/mutation_report.py) on made-up outcomes: the counts and scores
per module, survivors matched to the equivalent list by module, function and mutated line, and
every problem named (an unlisted survivor, a stale entry, a low score, a module not run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mutation_report import Mutant, load_equivalents, render_report, summarise, toml_entry  # noqa: E402

MODULE = "cellpaint/x.py"
KINDS = '[kinds]\ndtype = "the array has that dtype already"\n\n'


def outcome(*survivors: Mutant, killed: int = 97, timeouts: int = 0) -> dict:
    mutants = [Mutant(f"x.x_f__mutmut_{i}", "f", "killed").__dict__ for i in range(killed)]
    mutants += [Mutant(f"x.x_g__mutmut_{i}", "g", "timeout").__dict__ for i in range(timeouts)]
    mutants += [m.__dict__ for m in survivors]
    return {"module": MODULE, "tests": ["tests/test_x.py"], "wall_s": 60.0, "code": "abc1234", "date": "2026-12-01",
            "machine": "2 cores", "load": [1.0, 1.5], "jobs": 2, "mutants": mutants}


SAME = Mutant("x.x_h__mutmut_1", "h", "survived", 'a = np.zeros(3, dtype="float64")', "a = np.zeros(3, )")
REAL = Mutant("x.xǁCǁm__mutmut_2", "C.m", "no tests", "if n < 2:", "if n <= 2:")


def listing(tmp_path: Path, *entries: str) -> list:
    path = tmp_path / "equivalent.toml"
    path.write_text(KINDS + "\n".join(entries))
    return load_equivalents(path)


def test_listed_survivors_are_set_aside_and_the_rest_are_problems(tmp_path):
    equivalents = listing(tmp_path, toml_entry(MODULE, SAME, kind="dtype"))
    result = outcome(SAME, REAL, timeouts=1)
    s = summarise(result, equivalents)
    assert (s["total"], s["killed"], s["timeout"], s["survived"], s["no_tests"]) == (100, 97, 1, 2, 1)
    assert [m.name for m, _ in s["equivalent"]] == [SAME.name] and s["unlisted"] == [REAL]
    assert s["strict"] == pytest.approx(98.0) and s["set_aside"] == pytest.approx(98 / 99 * 100)
    report, problems = render_report([result], equivalents, modules=[MODULE, "cellpaint/y.py"])
    assert problems == [
        "cellpaint/y.py: no outcome saved (run benchmarks/mutation.py --module cellpaint/y.py)",
        f"{MODULE}: unlisted survivor {REAL.name} in C.m: 'if n < 2:' -> 'if n <= 2:'"]
    assert f"| `{MODULE}` | 100 | 97 | 1 | 2 | 1 | 1 | 98.0% | 99.0% | 1.0 min |" in report
    assert "the array has that dtype already" in report and "`if n < 2:` → `if n <= 2:`" in report


def test_a_low_score_and_a_stale_entry_are_problems(tmp_path):
    stale = Mutant("x.x_k__mutmut_9", "k", "survived", "return 1", "return 2")
    equivalents = listing(tmp_path, toml_entry(MODULE, SAME, why="one reason of its own"),
                          toml_entry(MODULE, stale, kind="dtype"))
    result = outcome(SAME, *[Mutant(f"x.x_q__mutmut_{i}", "q", "survived", f"v = {i}", f"v = {i + 1}")
                             for i in range(4)], killed=95)
    report, problems = render_report([result], equivalents, modules=[MODULE])
    assert f"{MODULE}: 96.0% with the equivalents set aside (< 97%)" in problems
    assert f"{MODULE}: stale equivalent entry (k: 'return 1' -> 'return 2') matches no survivor" in problems
    assert "one reason of its own" in report


def test_entries_round_trip_through_the_list_file(tmp_path):
    odd = Mutant("x.x_s__mutmut_3", "s", "survived", 'raise ValueError(f"{a!r}: \\\\ \'b\'")\nfoo(1)',
                 "raise ValueError(None)")
    (entry,) = listing(tmp_path, toml_entry(MODULE, odd, kind="dtype"))
    assert (entry.module, entry.function, entry.before, entry.after) == (MODULE, "s", odd.before, odd.after)
    assert entry.why == "the array has that dtype already"


def test_an_entry_without_a_reason_or_with_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gives no reason"):
        listing(tmp_path, toml_entry(MODULE, SAME))
    with pytest.raises(ValueError, match="names kind 'typo', which \\[kinds\\] does not define"):
        listing(tmp_path, toml_entry(MODULE, SAME, kind="typo"))


def test_a_listed_mutant_that_ran_out_of_time_is_set_aside_and_an_unlisted_one_detected(tmp_path):
    slow = Mutant("x.x_h__mutmut_1", SAME.function, "timeout", SAME.before, SAME.after)
    other = Mutant("x.x_t__mutmut_4", "t", "timeout", "while a:", "while not a:")
    s = summarise(outcome(slow, other, killed=98), listing(tmp_path, toml_entry(MODULE, SAME, kind="dtype")))
    assert [m.name for m, _ in s["equivalent"]] == [slow.name] and s["timeouts"] == [other]
    # the listed one counts with the survivors (set aside), not as detected
    assert (s["timeout"], s["survived"], s["unlisted"], s["stale"]) == (1, 1, [], [])
    report, _ = render_report([outcome(slow, other, killed=98)],
                              listing(tmp_path, toml_entry(MODULE, SAME, kind="dtype")), [MODULE])
    assert "- `cellpaint/x.py` `t`: `while a:` → `while not a:`" in report


def test_a_survivors_only_run_says_what_it_measured_again(tmp_path):
    result = outcome(SAME, REAL)
    result.update(code="def5678", wall_s=30.0, rerun={"of_code": "abc1234", "of_date": "2026-12-01", "mutants": 2,
                                                      "first_wall_s": 600.0})
    report, _ = render_report([result], [], [MODULE])
    assert (f"- `{MODULE}`: measured at abc1234 (10.0 min), then its 2 survivors tested again at def5678 with the "
            "tests then (the source unchanged; the wall time below is that second run's).") in report
    assert "measured at" not in render_report([outcome(SAME)], [], [MODULE])[0]
