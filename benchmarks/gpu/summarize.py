"""Summary of a benchmarks/gpu_check.sh run: OUT/summary.md (steps, tests, sanitizer, benchmark headline), the
test runs' JUnit files merged into OUT/tests.xml, and the `python -m ddpm_kernels bench` rows, when that step
ran, folded into OUT/bench.json and OUT/bench.md (the device machine returns at most 8 files).

    python benchmarks/gpu/summarize.py --out OUT --work WORK
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict


def _outcome(case: ET.Element) -> str:
    for child in case:
        if child.tag == "failure":
            return "failed"
        if child.tag == "error":
            return "error"
        if child.tag == "skipped":
            return "xfailed" if "xfail" in (child.get("type", "") + child.get("message", "")) else "skipped"
    return "passed"


def merge_junit(paths, out_path):
    """One <testsuites> holding every suite of the given files (missing or unreadable files are skipped); a
    suite name seen again replaces the earlier suite."""
    suites = {}  # by suite name (pytest -o junit_suite_name), so merging again changes nothing
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            tree = ET.parse(path).getroot()
        except ET.ParseError as exc:
            print(f"summarize: {path}: unreadable JUnit XML ({exc})", file=sys.stderr)
            continue
        for suite in [tree] if tree.tag == "testsuite" else list(tree.iter("testsuite")):
            suites[suite.get("name") or path] = suite
    root = ET.Element("testsuites")
    root.extend(suites.values())
    if len(root):
        tmp = out_path + ".tmp"
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, out_path)
    return root


def tests_section(root) -> list:
    cases = list(root.iter("testcase"))
    if not cases:
        return ["## Tests", "", "No test results (the test step did not run or wrote no JUnit file).", ""]
    total = Counter()
    per_file = defaultdict(Counter)
    problems, slow = [], []
    for case in cases:
        outcome = _outcome(case)
        total[outcome] += 1
        module = case.get("classname", "").split(".")
        name = next((m for m in module if m.startswith("test_")), case.get("classname", "?"))
        per_file[name][outcome] += 1
        slow.append((float(case.get("time", 0) or 0), f"{case.get('classname')}::{case.get('name')}"))
        if outcome in ("failed", "error"):
            child = next(c for c in case if c.tag in ("failure", "error"))
            message = (child.get("message") or (child.text or "").strip().splitlines()[-1:] or [""])
            message = message if isinstance(message, str) else message[0]
            problems.append(f"- `{case.get('classname')}::{case.get('name')}` ({outcome}): "
                            f"{message.splitlines()[0][:300] if message else ''}")
    order = ("passed", "failed", "error", "skipped", "xfailed")
    lines = ["## Tests", "", " · ".join(f"{total[k]} {k}" for k in order if total[k]) + f" ({len(cases)} in all)", "",
             "| file | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order)]
    for name in sorted(per_file):
        lines.append(f"| {name} | " + " | ".join(str(per_file[name][k] or "") for k in order) + " |")
    if problems:
        lines += ["", f"Failures and errors ({len(problems)}):", ""] + problems[:80]
        if len(problems) > 80:
            lines.append(f"- … and {len(problems) - 80} more (tests.xml)")
    slow = sorted((t, name) for t, name in slow if t >= 1.0)[::-1][:8]
    if slow:
        lines += ["", "Slowest: " + "; ".join(f"{name} {t:.1f} s" for t, name in slow)]
    return lines + [""]


def sanitizer_section(path) -> list:
    """One line per tool run: compute-sanitizer's own summary, the script's call count, and the exit status
    (gpu_check.sh marks each run with a '[gpu_check] tool NAME' line and ends it with '[gpu_check] NAME exit')."""
    lines = ["## compute-sanitizer", ""]
    if not os.path.exists(path):
        return lines + ["Not run.", ""]
    text = open(path, errors="replace").read()
    chunks = re.split(r"^.*\[gpu_check\] tool (\w+).*$", text, flags=re.M)
    if len(chunks) == 1:
        return lines + [chunks[0].strip()[:500] or "Empty log.", ""]
    for tool, chunk in zip(chunks[1::2], chunks[2::2]):
        found = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", chunk)
        calls = re.findall(r"^sanitize: \d+ calls.*$", chunk, flags=re.M)
        status = re.findall(r"\[gpu_check\] \w+ (exit .*)$", chunk, flags=re.M)
        lines.append(f"- {tool}: " + "; ".join(found + calls + status or ["no summary (cut short?)"]))
    return lines + [""]


def fold_cli_bench(work, out):
    """Add the `python -m ddpm_kernels bench` results to OUT/bench.json (key "cli") and OUT/bench.md."""
    cli_json, cli_md = os.path.join(work, "bench-cli.json"), os.path.join(work, "bench-cli.md")
    if not os.path.exists(cli_json):
        return
    bench_json = os.path.join(out, "bench.json")
    data = {}
    if os.path.exists(bench_json):
        try:
            data = json.load(open(bench_json))
        except json.JSONDecodeError:
            data = {}
    data["cli"] = json.load(open(cli_json))
    with open(bench_json + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(bench_json + ".tmp", bench_json)
    if os.path.exists(cli_md):
        with open(os.path.join(out, "bench.md"), "a") as f:
            f.write("\n\n## `python -m ddpm_kernels bench`\n\n" + open(cli_md).read())


def bench_section(out) -> list:
    lines = ["## Benchmark", ""]
    path = os.path.join(out, "bench.json")
    if not os.path.exists(path):
        return lines + ["Not run.", ""]
    try:
        data = json.load(open(path))
    except json.JSONDecodeError:
        return lines + ["bench.json unreadable (cut short while writing?).", ""]
    if data.get("skipped"):
        return lines + [f"Not run: {data['skipped']}.", ""]
    rows = [r for r in data.get("rows", []) if r.get("median_us")]
    lines.append(f"Copy bandwidth {data.get('peak_copy_gbps') or 0:.0f} GB/s; {len(rows)} timed rows, "
                 f"{len(data.get('loops', []))} loops (bench.md has them all).")
    if rows:
        largest = max(tuple(r["shape"]) for r in rows)
        lines += ["", f"Largest shape {'x'.join(map(str, largest))}, µs (% of copy bandwidth):", "",
                  "| op | dtype | eager | compile | cuda | triton | diffusers |", "|---|---|---:|---:|---:|---:|---:|"]
        table = defaultdict(dict)
        for r in rows:
            if tuple(r["shape"]) == largest:
                table[(r["op"], r["dtype"])][r["provider"]] = f"{r['median_us']:.1f} ({r.get('pct_copy_bw', 0):.0f}%)"
        for (op, dtype), cells in table.items():
            lines.append(f"| {op} | {dtype} | " + " | ".join(cells.get(p, "") for p in
                                                           ("eager", "compile", "cuda", "triton", "diffusers")) + " |")
    loops = [e for e in data.get("loops", []) if "graph_ms" in e]
    if loops:
        lines += ["", "50-step loops: " + "; ".join(
            f"{e['loop']}/{e['backend']}/{e['dtype']} {e['eager_ms']:.2f}→{e['graph_ms']:.2f} ms"
            f"{'' if e['replay_equals_eager'] else ' (replay ≠ eager)'}" for e in loops)]
    if data.get("notes"):
        lines += [""] + [f"- {n}" for n in data["notes"]]
    return lines + [""]


def steps_section(work) -> list:
    path = os.path.join(work, "steps.tsv")
    lines = ["## Steps", "", "| step | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t") + [""] * 5
            lines.append("| " + " | ".join(parts[:5]) + " |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    out, work = args.out, args.work
    root = merge_junit([os.path.join(out, "tests.xml"), os.path.join(work, "tests-b.xml")],
                       os.path.join(out, "tests.xml"))
    fold_cli_bench(work, out)
    head = ["# GPU check", ""]
    env = os.path.join(work, "headline.txt")
    if os.path.exists(env):
        head += [open(env).read().strip(), ""]
    text = "\n".join(head + steps_section(work) + tests_section(root) + sanitizer_section(
        os.path.join(out, "sanitizer.log")) + bench_section(out))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
