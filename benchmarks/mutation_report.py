"""The report of `benchmarks/mutation.py`: outcomes + the list of equivalent mutants -> MUTATION.md.

Pure Python (no mutmut, no numpy): the project's tests check it on made-up outcomes.

A mutant is *detected* when the tests failed on it: killed, or it ran past its time limit or
crashed the test process (the suite would not pass either). Every other outcome is a survivor:
survived, or "no tests" (no selected test reached its function). A survivor is either listed in
the equivalent list (it cannot change behaviour; the list says why) or it is a finding.
"""
from __future__ import annotations

import json
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DETECTED = {"killed", "timeout", "segfault"}
MIN_SCORE = 97.0  # per module, with the listed equivalent mutants set aside (issue 26)


@dataclass
class Mutant:
    name: str          # mutmut's name (numbered: changes when the module changes)
    function: str      # "function" or "Class.method"
    status: str        # mutmut's status: killed, survived, no tests, timeout, ...
    before: str = ""   # the mutated source line(s), stripped; empty for killed mutants
    after: str = ""


@dataclass(frozen=True)
class Equivalent:
    module: str
    function: str
    before: str
    after: str
    why: str
    kind: str = ""     # the shared reason's name, "" for a reason of its own

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.module, self.function, self.before, self.after


def load_equivalents(path: Path) -> list[Equivalent]:
    """The listed equivalent mutants: `[[equivalent]]` tables (module, function, before, after
    and either `kind`, a key of the `[kinds]` table of shared reasons, or `why`)."""
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    kinds = data.get("kinds", {})
    out = []
    for i, entry in enumerate(data.get("equivalent", [])):
        kind = entry.get("kind", "")
        if kind and kind not in kinds:
            raise ValueError(f"{path}: equivalent #{i + 1} names kind {kind!r}, which [kinds] does not define")
        why = entry.get("why") or kinds.get(kind, "")
        if not why:
            raise ValueError(f"{path}: equivalent #{i + 1} ({entry.get('function')}) gives no reason")
        out.append(Equivalent(module=entry["module"], function=entry["function"], before=entry["before"].strip(),
                              after=entry["after"].strip(), why=why, kind=kind))
    return out


def toml_entry(module: str, m: Mutant, kind: str = "", why: str = "") -> str:
    """A survivor as an `[[equivalent]]` entry of the list (JSON strings are TOML basic strings)."""
    def q(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)
    reason = f"kind = {q(kind)}" if kind else f"why = {q(why)}"
    return (f"[[equivalent]]\nmodule = {q(module)}\nfunction = {q(m.function)}\n"
            f"before = {q(m.before)}\nafter = {q(m.after)}\n{reason}\n")


def _score(detected: int, total: int) -> float:
    return 100.0 * detected / total if total else 100.0


def _code(text: str) -> str:
    """Source lines inline in markdown (a table cell or a list item)."""
    return " ⏎ ".join(f"`{line}`" if "`" not in line else f"``{line}``" for line in text.split("\n")) or "(nothing)"


def summarise(result: dict, equivalents: list[Equivalent]) -> dict:
    """Counts of one module's outcomes; survivors split into listed (equivalent) and unlisted."""
    listed = {e.key: e for e in equivalents if e.module == result["module"]}
    counts: dict[str, int] = defaultdict(int)
    equivalent, unlisted, timeouts, matched = [], [], [], set()
    for m in map(lambda d: Mutant(**d), result["mutants"]):
        key = (result["module"], m.function, m.before.strip(), m.after.strip())
        if m.status != "killed" and key in listed:
            # set aside even when it ran out of time: a listed mutant's timeout is the machine's
            # load (mutmut limits CPU time, which busy threads inflate), not a test failing
            equivalent.append((m, listed[key]))
            matched.add(key)
            continue
        counts[m.status] += 1
        if m.status in ("timeout", "segfault"):
            timeouts.append(m)
        elif m.status not in DETECTED:
            unlisted.append(m)
    total = len(result["mutants"])
    detected = sum(counts[s] for s in DETECTED)
    return {"total": total, "killed": counts["killed"], "timeout": counts["timeout"] + counts["segfault"],
            "survived": total - detected, "no_tests": counts["no tests"], "equivalent": equivalent,
            "unlisted": unlisted, "timeouts": timeouts, "stale": [e for k, e in listed.items() if k not in matched],
            "strict": _score(detected, total), "set_aside": _score(detected, total - len(equivalent))}


def unlisted_entries(results: list[dict], equivalents: list[Equivalent]) -> str:
    """Every unlisted survivor as a list entry without a reason yet: to paste and complete, or
    to kill with a test."""
    return "\n".join(toml_entry(r["module"], m) for r in results for m in summarise(r, equivalents)["unlisted"])


def render_report(results: list[dict], equivalents: list[Equivalent], modules: list[str]) -> tuple[str, list[str]]:
    """(MUTATION.md, problems): a problem is a module without outcomes, a score under MIN_SCORE,
    an unlisted survivor or a listed equivalent that matches no survivor."""
    problems: list[str] = []
    by_module = {r["module"]: r for r in results}
    for module in modules:
        if module not in by_module:
            problems.append(f"{module}: no outcome saved (run benchmarks/mutation.py --module {module})")
    summaries = {r["module"]: summarise(r, equivalents) for r in results if r["module"] in modules}
    lines = ["# Mutation testing of the scientific core", "",
             "Written by `make mutation` (`benchmarks/mutation.py`, mutmut 3.8.1): every module below was mutated",
             "alone and tested with the tests that check it directly (the table in `benchmarks/mutation.py`,",
             "listed under the table below). Training runs and other end-to-end tests are left out for time, so a",
             "mutant only they would catch counts as a survivor here: the scores are lower bounds.",
             "*Detected* = killed, or past its time limit (the suite would hang; listed below). *Survived*",
             "includes mutants no selected test reaches. *Equivalent*: survivors listed in",
             "`benchmarks/mutation_equivalent.toml`",
             "as unable to change behaviour, each with its reason (below). Strict score = detected / mutants;",
             "set aside = detected / (mutants - equivalent).", ""]
    if results:
        first = results[0]
        total_wall = sum(r["wall_s"] for r in results)
        codes = sorted({r["code"] for r in results})
        lines += [f"- Measured {', '.join(sorted({r['date'] for r in results}))} on the code at {', '.join(codes)};",
                  f"  {first['machine']}; {first['jobs']} mutants at a time.",
                  f"- Wall time: {total_wall / 60:.0f} min in all (per module below; load average "
                  f"{min(min(r['load']) for r in results):.1f}-{max(max(r['load']) for r in results):.1f}"
                  " at the starts and ends of the runs)."]
        for r in results:
            if "rerun" in r:  # a survivors-only run (benchmarks/mutation.py --survivors-only)
                rerun = r["rerun"]
                measured = f"{rerun['of_code']} ({rerun['first_wall_s'] / 60:.1f} min)"
                lines.append(f"- `{r['module']}`: measured at {measured}, then its {rerun['mutants']} survivors tested "
                             f"again at {r['code']} with the tests then (the source unchanged; the wall time below "
                             "is that second run's).")
        lines.append("")
    lines += ["| module | mutants | killed | timeout | survived | equivalent | unlisted | strict | set aside | wall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for module, s in summaries.items():
        lines.append(f"| `{module}` | {s['total']} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                     f"{len(s['equivalent'])} | {len(s['unlisted'])} | {s['strict']:.1f}% | {s['set_aside']:.1f}% | "
                     f"{by_module[module]['wall_s'] / 60:.1f} min |")
        if s["set_aside"] < MIN_SCORE:
            problems.append(f"{module}: {s['set_aside']:.1f}% with the equivalents set aside (< {MIN_SCORE:.0f}%)")
        problems += [f"{module}: unlisted survivor {m.name} in {m.function}: {m.before!r} -> {m.after!r}"
                     for m in s["unlisted"]]
        problems += [f"{module}: stale equivalent entry ({e.function}: {e.before!r} -> {e.after!r}) matches no survivor"
                     for e in s["stale"]]
    lines += ["", "Tests per module:", ""]
    lines += [f"- `{m}`: {', '.join(f'`{t}`' for t in by_module[m]['tests'])}" for m in summaries]
    unlisted = [(module, m) for module, s in summaries.items() for m in s["unlisted"]]
    lines += ["", "## Survivors not listed as equivalent", ""]
    lines += [f"- `{module}` `{m.function}` ({m.status}): {_code(m.before)} → {_code(m.after)}" for module, m in unlisted] \
        or ["None: every survivor is listed below."]
    timeouts = [(module, m) for module, s in summaries.items() for m in s["timeouts"]]
    lines += ["", "## Mutants detected by running out of time", "",
              "(mutmut stops a run at (estimated time + 1 s) x 30 of CPU time; counted as detected.)", ""]
    lines += [f"- `{module}` `{m.function}`: {_code(m.before)} → {_code(m.after)}" for module, m in timeouts] \
        or ["None."]
    lines += ["", "## Equivalent survivors, by module and reason", ""]
    for module, s in summaries.items():
        if not s["equivalent"]:
            continue
        lines += [f"### `{module}` ({len(s['equivalent'])})", ""]
        by_reason: dict[str, list] = defaultdict(list)
        for m, e in s["equivalent"]:
            by_reason[e.why].append(m)
        for why, ms in by_reason.items():
            lines.append(f"- {why}")
            lines += [f"  - `{m.function}`: {_code(m.before)} → {_code(m.after)}" for m in ms]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n", problems
