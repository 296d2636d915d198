#!/usr/bin/env python3
"""Mutation testing of the scientific core: does the suite fail when the science is wrong?

    make mutation                       # builds .venv-mutation, runs every module, writes MUTATION.md
    .venv-mutation/bin/python benchmarks/mutation.py [--module plates ...] [--jobs 2] [--report-only]
                                        [--survivors-only]

For each module of MODULES, one at a time: a fresh copy of the project's files (tracked and
untracked, not ignored: the code as it is now) in `mutants/<slug>/`, a `setup.cfg` that has
mutmut 3 mutate that one module and select the tests that check it, `mutmut run` there, and the
outcome of every mutant (with the diff of each survivor) saved as `mutants/<slug>.json`.
Then `benchmarks/MUTATION.md` is written from all the saved outcomes: per module the mutants,
killed, survived, timeouts, the survivors listed as equivalent in `mutation_equivalent.toml`
(each with its reason), the strict score and the score with those set aside, and every survivor
that is *not* listed (a test is missing, or the list is), also written as list entries to
complete in `mutants/unlisted.toml`. The exit status is 1 when a module scores under 97% with
its equivalents set aside, a survivor is unlisted or a listed entry matches no survivor.
`--report-only` rewrites the report from the saved outcomes; `--module` runs only the named
modules (by slug, file stem or path), keeping the others' saved outcomes. `--survivors-only`
tests again only the survivors of a module's saved run, with the tests as they are now, where the
module's source is the one that run measured (after tests were added; the report says so).

When modules move, edit MODULES only: the source path and its tests. The
equivalent list is keyed by module path, function and the mutated line, never by mutmut's
mutant numbers, so it survives edits elsewhere; entries that no longer match a survivor are
reported as stale.

Runs under the mutation venv (mutmut 3.8.1 beside the project's .venv, see the Makefile).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from mutation_report import DETECTED, Mutant, load_equivalents, render_report, unlisted_entries  # noqa: E402

# ------------------------------------------------------------------------- the table to edit
# module -> the tests that check it: test files, or single tests as pytest node ids ("file::test").
# In-process tests only (mutmut sees the calls made in its own process), and fast ones: every
# mutant that survives reruns all the tests that reached its function, so a training run here
# would cost minutes per equivalent mutant; the end-to-end tests stay in `make test`.
TRAINER = "tests/test_trainer.py::"
BEYOND = "tests/test_beyond.py::"
WILDS = "tests/test_wilds.py::"
DATA = "tests/test_data.py::"
RECIPE = "tests/test_recipe.py::"
MODULES: dict[str, list[str]] = {
    "cellpaint/data/plates.py": ["tests/test_plates.py", "tests/test_plates_contract.py",
                                 "tests/test_chunked_sizes.py", "tests/test_recipe_boundaries.py",
                                 "tests/test_plate_balance.py",
                                 BEYOND + "test_sinkhorn_leaves_rows_and_columns_at_their_targets",
                                 BEYOND + "test_column_balancing_gives_every_class_its_share",
                                 BEYOND + "test_balancing_log_probabilities_leaves_a_complete_plates_assignment_alone"],
    "cellpaint/core/schedule.py": [TRAINER + "test_lr_schedule_matches_the_formula",
                                   TRAINER + "test_lr_schedule_rejects_bad_text",
                                   TRAINER + "test_size_function_is_evaluated_safely",
                                   TRAINER + "test_pl_fraction_follows_the_original_schedule",
                                   "tests/test_schedules.py", "tests/test_setting_round_trips.py",
                                   "tests/test_size_schedule.py",
                                   BEYOND + "test_size_schedule_reads_back_and_gives_each_epoch_its_size",
                                   BEYOND + "test_bad_size_schedules_are_one_line_usage_errors"],
    "cellpaint/modes/pseudo_labels.py": [TRAINER + "test_pl_fraction_follows_the_original_schedule",
                                         TRAINER + "test_pseudo_label_selection_respects_plates",
                                         "tests/test_pseudo_labelling.py", "tests/test_pseudo_labelling_wilds.py",
                                         "tests/test_recipe_boundaries.py"],
    "cellpaint/data/folds.py": ["tests/test_data.py", "tests/test_recipe_boundaries.py", "tests/test_fold_edges.py",
                                WILDS + "test_trainer_subsets_are_the_wilds_parts"],
    "cellpaint/modes/knn.py": ["tests/test_knn.py", "tests/test_knn_contract.py", "tests/test_chunked_sizes.py",
                               BEYOND + "test_centring_gives_each_plate_mean_zero"],
    # (test_recipe.py's and test_data.py's tests that build the synthetic data set are left out: made again
    # in every mutant's process, they took most of an hour; test_augment_flags.py covers that path on files)
    "cellpaint/data/augment.py": ["tests/test_augment_draws.py", "tests/test_augment_flags.py",
                                  "tests/test_augment_resize.py",
                                  DATA + "test_geometric_augmentations_keep_shape_and_dtype", DATA + "test_rotation",
                                  DATA + "test_gamma_brightness_contrast",
                                  RECIPE + "test_aug_prob_zero_is_identity_and_one_always_applies",
                                  RECIPE + "test_gamma_range_draws_the_inverse_of_a_uniform_gamma",
                                  RECIPE + "test_reflect_borders_fold_coordinates_like_cv2",
                                  RECIPE + "test_rotation_with_reflected_border_fills_the_corners_and_keeps_exact_turns",
                                  RECIPE + "test_raw_brightness_contrast_formula",
                                  RECIPE + "test_rescale_is_a_resolution_jitter_back_to_full_size"],
    "cellpaint/modes/submission_inputs.py": ["tests/test_submission_wells.py", "tests/test_matched_files.py",
                                             "tests/test_submission.py",
                                             "tests/test_knn.py"],
    "cellpaint/data/prediction_file.py": ["tests/test_prediction_file_format.py", "tests/test_prediction_file_sites.py",
                                          "tests/test_submission.py",
                                          "tests/test_knn.py"],
    "cellpaint/data/metadata.py": ["tests/test_metadata_readers.py", "tests/test_metadata_layouts.py",
                                   "tests/test_data.py", "tests/test_recipe_boundaries.py",
                                   WILDS + "test_wilds_layout_read_back_exactly",
                                   WILDS + "test_split_parts_have_the_rows_wilds_defines"],
    "cellpaint/data/structure.py": ["tests/test_metadata_readers.py", "tests/test_data.py",
                                    "tests/test_recipe_boundaries.py"],
}
SOURCE_ROOT = "cellpaint"          # the package mutmut copies into its mutants/ folder
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
REPORT = ROOT / "benchmarks" / "MUTATION.md"
WORK = ROOT / "mutants"            # gitignored: copies, mutmut's state, saved outcomes, logs

MUTMUT_SETTINGS = {
    # torch and pytest in one process that then forks: keep the forking process free of both
    "process_isolation": "forkserver",
    # the copy in mutants/<slug> is no git checkout
    "use_git_change_detection": "false",
}


# A pytest plugin for the runs on mutants: the tests cheapest first, by mutmut's measured duration of
# each test plus what its fixtures cost to set up (measured by this plugin in mutmut's first, full
# run; a session fixture such as a synthetic data set is made again in every mutant's run). mutmut
# stops a mutant's run at its first failing test, so a killed mutant then costs the cheapest test
# that kills it rather than whatever ran first; the outcome is the same.
ORDER_PLUGIN = "mutation_test_order"
ORDER_PLUGIN_SOURCE = '''"""Written by benchmarks/mutation.py: run the cheapest tests first."""
import json
import time
from pathlib import Path

import pytest

STATS, COSTS = Path("mutmut-stats.json"), Path("mutation-fixture-costs.json")
measured = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    start = time.perf_counter()
    yield
    name = fixturedef.argname
    measured[name] = max(measured.get(name, 0.0), time.perf_counter() - start)


def pytest_sessionfinish(session):
    # mutmut's first run of the tests, which measures their durations (not a collect-only session)
    if measured and not STATS.exists() and not COSTS.exists():
        COSTS.write_text(json.dumps(measured))


def pytest_collection_modifyitems(items):
    if STATS.exists() and COSTS.exists():
        duration = json.loads(STATS.read_text()).get("duration_by_test", {})
        cost = json.loads(COSTS.read_text())
        items.sort(key=lambda item: duration.get(item.nodeid, 0.0)
                   + sum(cost.get(name, 0.0) for name in item.fixturenames))
'''


def slug(module: str) -> str:
    return Path(module).with_suffix("").as_posix().replace("/", "_")


def project_files() -> list[str]:
    """The files of the project as they are now: tracked and untracked, not ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return sorted(p for p in set(out.split("\0")) if p and (ROOT / p).is_file() and not (ROOT / p).is_symlink())


def prepare(module: str, tests: list[str], work: Path) -> None:
    """A fresh copy of the project in `work` with a setup.cfg for mutating `module` alone."""
    if work.exists():
        shutil.rmtree(work)
    files = project_files()
    for rel in files:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, work / rel)
    missing = [t for t in [module, *tests] if not (work / t.split("::")[0]).is_file()]
    if missing:
        raise SystemExit(f"mutation: {', '.join(missing)} not found: update MODULES in {Path(__file__).name}")
    # everything at the top level beside the package and the tests, which mutmut copies itself:
    # the scripts the tests import (main.py, synthetic.py, ...), recipes/, tools/, ...
    also_copy = sorted({rel.split("/")[0] for rel in files} - {SOURCE_ROOT, "tests"})

    (work / f"{ORDER_PLUGIN}.py").write_text(ORDER_PLUGIN_SOURCE)
    also_copy.append(f"{ORDER_PLUGIN}.py")

    def listing(values: list[str]) -> str:
        return "".join(f"\n    {v}" for v in values)

    settings = {"source_paths": listing([SOURCE_ROOT]), "only_mutate": listing([module]),
                "also_copy": listing(also_copy), "pytest_add_cli_args_test_selection": listing(tests),
                "pytest_add_cli_args": listing(["-p", "no:cacheprovider", "-p", ORDER_PLUGIN]), **MUTMUT_SETTINGS}
    (work / "setup.cfg").write_text("[mutmut]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


def run_mutmut(work: Path, jobs: int, log: Path, names: list[str] | None = None) -> None:
    """`mutmut run` in `work`: every mutant, or only those `names`."""
    mutmut = Path(sys.executable).parent / "mutmut"
    if not mutmut.exists():
        raise SystemExit(f"mutation: no mutmut beside {sys.executable}: run `make mutation`")
    # one thread per test process: `jobs` of them share the cores, and idle threads spinning under
    # load would eat into mutmut's CPU-time limit (a false timeout counts as detected)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as out:
        rc = subprocess.run([str(mutmut), "run", "--max-children", str(jobs), *(names or [])], cwd=work, stdout=out,
                            stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"mutation: mutmut failed in {work} (exit {rc}); end of {log}:\n{tail}")


def diff_lines(diff: str) -> tuple[str, str]:
    """(removed lines, added lines) of a unified diff, each stripped and joined by newlines."""
    body = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    removed = [line[1:].strip() for line in body if line.startswith("-")]
    added = [line[1:].strip() for line in body if line.startswith("+")]
    return "\n".join(removed), "\n".join(added)


def collect(module: str, work: Path, earlier: dict[str, str] | None = None) -> list[Mutant]:
    """Every mutant of `module` with its status; the diff of each one that was not killed. A mutant
    this run did not test (a survivors-only run) keeps its status from `earlier` (name -> status)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    mutants = []
    here = os.getcwd()
    os.chdir(work)  # mutmut reads the mutated file relative to the project it ran in
    try:
        for name, code in sorted(meta["exit_code_by_key"].items()):
            status = status_by_exit_code[code]
            if code is None and earlier and name in earlier:
                status = earlier[name]
            function, cls = orig_function_and_class_names_from_key(name)
            before = after = ""
            if status != "killed":
                before, after = diff_lines(get_diff_for_mutant(name, path=module))
            mutants.append(Mutant(name=name, function=f"{cls}.{function}" if cls else function,
                                  status=status, before=before, after=after))
    finally:
        os.chdir(here)
    return mutants


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Python {platform.python_version()}"


def code_version() -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if run("status", "--porcelain",
                                                                                  "--untracked-files=no") else "")


def earlier_outcome(module: str) -> dict | None:
    """The saved outcome of `module`, if the module's source is still the one it was measured on
    (the copy its run made is compared byte for byte)."""
    saved, copy = WORK / f"{slug(module)}.json", WORK / slug(module) / module
    if saved.exists() and copy.exists() and copy.read_bytes() == (ROOT / module).read_bytes():
        return json.loads(saved.read_text())
    return None


def run_module(module: str, jobs: int, survivors_only: bool = False) -> dict:
    """Mutate `module` and test every mutant; with `survivors_only` (the module's source unchanged
    since its saved run) test only that run's survivors, with the tests as they are now, and keep
    its other outcomes: tests are only ever added, so a detected mutant stays detected."""
    work = WORK / slug(module)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    earlier = earlier_outcome(module) if survivors_only else None
    if survivors_only and earlier is None:
        print(f"mutation: {module}: no saved outcome of this source, every mutant is tested", flush=True)
    names = [m["name"] for m in earlier["mutants"] if m["status"] not in DETECTED] if earlier else None
    code = code_version()  # what is copied now is what the mutants run with
    prepare(module, MODULES[module], work)
    if names == []:
        mutants = [Mutant(**m) for m in earlier["mutants"]]
    else:
        run_mutmut(work, jobs, WORK / f"{slug(module)}.log", names)
        mutants = collect(module, work, {m["name"]: m["status"] for m in earlier["mutants"]} if earlier else None)
    result = {"module": module, "tests": MODULES[module], "wall_s": time.perf_counter() - start,
              "code": code, "date": datetime.date.today().isoformat(), "machine": machine(),
              "load": [load_before, os.getloadavg()[0]], "jobs": jobs,
              "mutants": [m.__dict__ for m in mutants]}
    if earlier:
        # what this run added to the earlier one: its survivors tested again
        result["rerun"] = {"of_code": earlier["code"], "of_date": earlier["date"], "mutants": len(names),
                           "first_wall_s": earlier.get("rerun", {}).get("first_wall_s", earlier["wall_s"])}
    (WORK / f"{slug(module)}.json").write_text(json.dumps(result, indent=1))
    return result


def saved_results() -> list[dict]:
    results = []
    for module in MODULES:
        path = WORK / f"{slug(module)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", default=[],
                        help="run only this module (slug or path; repeatable); default: all of MODULES")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from saved outcomes")
    parser.add_argument("--survivors-only", action="store_true",
                        help="test again only the survivors of each module's saved run, with the tests as they "
                             "are now (its source unchanged; otherwise every mutant)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    by_name = {**{slug(m): m for m in MODULES}, **{m: m for m in MODULES},
               **{Path(m).stem: m for m in MODULES}}
    unknown = [m for m in args.module if m not in by_name]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    chosen = [by_name[m] for m in args.module] or list(MODULES)
    WORK.mkdir(exist_ok=True)
    if not args.report_only:
        for module in chosen:
            print(f"mutation: {module} ...", flush=True)
            result = run_module(module, args.jobs, args.survivors_only)
            print(f"mutation: {module}: {len(result['mutants'])} mutants in {result['wall_s']:.0f} s", flush=True)
    results = saved_results()
    equivalents = load_equivalents(EQUIVALENT)
    report, problems = render_report(results, equivalents, modules=list(MODULES))
    args.report.write_text(report)
    (WORK / "unlisted.toml").write_text(unlisted_entries(results, equivalents))
    print(f"mutation: wrote {args.report.relative_to(ROOT) if args.report.is_relative_to(ROOT) else args.report}")
    for problem in problems[:20]:
        print(f"mutation: {problem}")
    if len(problems) > 20:
        print(f"mutation: ... {len(problems) - 20} more (all in {args.report.name})")
    if problems:
        print(f"mutation: the unlisted survivors as list entries (to kill with a test, or to complete with "
              f"the reason they are equivalent and add to {EQUIVALENT.name}): {WORK / 'unlisted.toml'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
