"""Run issue 12's corruption sweep and print the failing cases grouped by cause, with counts.

    python tests/sweep_report.py                      # the full sweep (all commands, files, faults)
    python tests/sweep_report.py --command resume     # one command (repeatable)
    python tests/sweep_report.py --default            # only tests/test_sweep.py's DEFAULT_CASES
    python tests/sweep_report.py --exclude 'resume:checkpoint-000002/*'   # skip cases by id (fnmatch)
    python tests/sweep_report.py --json out.json      # also write every outcome as JSON

Rerun it after a fix to report the counts before and after. It builds its trees in a temporary
directory, with its own FINETUNE_CACHE, and removes them at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", action="append", help="only this command (repeatable)")
    parser.add_argument("--default", action="store_true", help="only the default suite's cases")
    parser.add_argument("--exclude", action="append", default=[], help="skip the cases whose id matches this glob")
    parser.add_argument("--json", help="write every outcome to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="finetune-sweep-") as tmp:
        os.environ["FINETUNE_CACHE"] = str(Path(tmp) / "cache")  # before finetune is imported
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.path.insert(0, str(TESTS))
        from sweep_cases import Sweep, all_cases, build_trees, describe, group

        started = time.time()
        sweep = Sweep(build_trees(Path(tmp) / "trees"), Path(tmp) / "cases")
        if args.default:
            from test_sweep import DEFAULT_CASES

            cases = [case for case in DEFAULT_CASES if not args.command or case.command in args.command]
        else:
            cases = list(all_cases(sweep.trees, args.command))
        cases = [case for case in cases if not any(fnmatch.fnmatchcase(case.id, glob) for glob in args.exclude)]
        outcomes = []
        for number, case in enumerate(cases, 1):
            outcome = sweep.run(case)
            outcomes.append(outcome)
            print(
                f"[{number}/{len(cases)}] {'pass' if outcome.passed else 'FAIL'} {case.id}", file=sys.stderr, flush=True
            )

    failing = [outcome for outcome in outcomes if not outcome.passed]
    print(
        f"\n{len(outcomes)} cases, {len(outcomes) - len(failing)} pass, {len(failing)} fail "
        f"({time.time() - started:.0f} s)"
    )
    by_command = Counter(o.case.command for o in failing)
    totals = Counter(o.case.command for o in outcomes)
    for command in totals:
        print(f"  {command}: {by_command[command]} of {totals[command]} fail")
    groups = group(failing)
    print("\nfailing cases by cause (a case with several causes is listed under each):")
    for cause, items in groups.items():
        print(f"  {cause}: {len(items)}")
    print("\nfailing files (causes | command | file | faults):")
    for line in compact(failing):
        print(f"  {line}")
    for cause, items in groups.items():
        if items:
            print(f"\n== {cause} ({len(items)})")
            for outcome in items:
                print(f"  {describe(outcome)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "case": o.case.id,
                        "expected": o.expected,
                        "exit_code": o.exit_code,
                        "stderr": o.stderr[-2000:],
                        "problems": o.problems,
                    }
                    for o in outcomes
                ],
                indent=1,
            )
        )
    return 1 if failing else 0


def compact(failing) -> list[str]:
    """One line per damaged file: its causes, the command, and the faults that fail on it."""
    faults: dict[tuple[str, str, str], list[str]] = {}
    for outcome in failing:
        causes = " + ".join(sorted({cause for cause, _ in outcome.problems}))
        faults.setdefault((causes, outcome.case.command, outcome.case.relative), []).append(outcome.case.fault)
    return [
        f"{causes} | {command} | {relative} | {', '.join(names)}"
        for (causes, command, relative), names in sorted(faults.items())
    ]


if __name__ == "__main__":
    sys.exit(main())
