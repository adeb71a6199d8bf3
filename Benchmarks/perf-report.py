#!/usr/bin/env python3
"""Compare Corral with the Go reference on the standard workloads and write a report.

Builds the Go reference (../shared/bench/go-reference/run.sh, into a temporary folder
outside the source tree) and the `corral-workloads` executable of this package (release
mode), then, for every workload of ../shared/bench/WORKLOADS.md that either side
implements, runs the Go reference and each `corral-workloads` implementation of it
(`impl=corral` and the Swift baselines: taskgroup, asyncstream, actor, ...) alternately,
one process at a time:

    go, corral, <baseline>..., go, corral, <baseline>..., ...      (--rounds R, default 3)

Nothing of ours runs concurrently with a measured process (WORKLOADS.md: a busy core skews
the figures), and before each run the script waits (--quiet-wait, up to 120 s) while other
processes keep more than 25% of the CPUs busy; the report counts the runs that started
busy anyway. The median of each implementation's main metric (ns_per_op; bytes_per_task and
cancel_ns for tasks.idle_memory; the whole run, in ms, for group.cancel_latency) goes into

    Results/report.md   Markdown table: workload | Go | Corral | Swift baseline(s) |
                        Corral / Go | baseline / Go, with the date, machine, Swift and Go
                        versions, the workloads one side lacks, and every raw line
    Results/ratios.svg  horizontal bar chart of Corral / Go per workload (log scale,
                        line at 1.0x; left of it Corral is faster or smaller)

and the table is printed to stdout (progress goes to stderr). Exit status: 0 when every
run passed its check; 1 when a program exited non-zero or timed out (each failure is
named on stderr; the report is still written, with FAILED in that cell); 2 on bad
arguments or a failed build.

Examples:

    python3 Benchmarks/perf-report.py                       # full report, 3 rounds
    python3 Benchmarks/perf-report.py --only chan.spsc,sem.contended --rounds 5
    python3 Benchmarks/perf-report.py --no-build --go-bin /tmp/goref/go-reference --n 10000

Standard library only; Linux (reads /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from xml.sax.saxutils import escape

BENCH_DIR = Path(__file__).resolve().parent  # the Benchmarks/ package
REPO_DIR = BENCH_DIR.parent
DEFAULT_SHARED = REPO_DIR.parent / "shared" / "bench"
PRODUCT = "corral-workloads"


@dataclass(frozen=True)
class Metric:
    """One figure that a workload's row compares."""

    field: str  # key in the output line
    label: str  # shown after the workload name ("" for plain ns/op)
    scale: float = 1.0  # displayed value = raw / scale


NS_PER_OP = Metric("ns_per_op", "")
# Workloads whose main figure is not ns per operation (see WORKLOADS.md).
METRICS: dict[str, list[Metric]] = {
    "group.cancel_latency": [Metric("ns_per_op", "ms, whole run", 1e6)],
    "tasks.idle_memory": [
        Metric("bytes_per_task", "bytes per task"),
        Metric("cancel_ns", "ms to cancel all", 1e6),
    ],
}


@dataclass
class Failure:
    workload: str
    impl: str
    round: int
    reason: str

    def __str__(self) -> str:
        return f"{self.workload} impl={self.impl} (round {self.round}): {self.reason}"


@dataclass
class Series:
    """All runs of one implementation of one workload."""

    workload: str
    impl: str
    lines: list[dict[str, str]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    failed: bool = False

    def values(self, metric: Metric) -> list[float]:
        out = []
        for line in self.lines:
            try:
                out.append(float(line[metric.field]) / metric.scale)
            except (KeyError, ValueError):
                pass
        return out

    def median(self, metric: Metric) -> float | None:
        vals = self.values(metric)
        return statistics.median(vals) if vals else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def die(message: str) -> NoReturn:
    """Bad arguments, a failed build, a program that cannot be used: exit status 2."""
    log(f"perf-report: {message}")
    sys.exit(2)


# ---------------------------------------------------------------------------
# Workloads, builds and discovery


def read_workloads(path: Path) -> list[str]:
    """Workload names from the table of WORKLOADS.md, in its order."""
    names = []
    for line in path.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z0-9_.]+)`\s*\|", line)
        if m:
            names.append(m.group(1))
    if not names:
        die(f"no workload table found in {path}")
    return names


def build_go(shared: Path, go_bin: str | None, build: bool, tmp: list[Path]) -> Path:
    if go_bin:
        path = Path(go_bin).resolve()
        if not os.access(path, os.X_OK):
            die(f"--go-bin {path} is not an executable")
        return path
    if not build:
        die("--no-build needs --go-bin PATH for the Go reference")
    out = Path(tempfile.mkdtemp(prefix="corral-goref-"))
    tmp.append(out)
    script = shared / "go-reference" / "run.sh"
    log(f"perf-report: building the Go reference ({script}) into {out}")
    proc = subprocess.run(["bash", str(script), str(out)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        die(f"{script} failed with exit status {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def build_corral(build: bool) -> Path:
    base = ["swift", "build", "-c", "release", "--product", PRODUCT]
    if build:
        # A stale build plan can miss a newly added source file; make SwiftPM re-plan.
        for stale in (".build/release.yaml", ".build/x86_64-unknown-linux-gnu/release/description.json"):
            (BENCH_DIR / stale).unlink(missing_ok=True)
        log(f"perf-report: {' '.join(base)} (in {BENCH_DIR})")
        proc = subprocess.run(base, cwd=BENCH_DIR, stdout=sys.stderr)
        if proc.returncode != 0:
            die(f"swift build failed with exit status {proc.returncode}")
    try:
        bin_dir = subprocess.run(
            base + ["--show-bin-path"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip().splitlines()[-1]
        path = Path(bin_dir) / PRODUCT
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        path = BENCH_DIR / ".build" / "release" / PRODUCT
    if not os.access(path, os.X_OK):
        die(f"{path} not found (build it, or drop --no-build)")
    return path


def listed_workloads(binary: Path) -> set[str]:
    """The names a program's usage message lists (both print `workloads: a b c`)."""
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    for line in proc.stderr.splitlines():
        if line.startswith("workloads:"):
            return set(line.split()[1:])
    die(f"cannot read the workload list from {binary}'s usage")


def parse_line(text: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def corral_impls(binary: Path, name: str) -> list[str]:
    """Implementations of `name` in corral-workloads: a quick pass at N=1 prints one line
    each (whole-run workloads run in full). If that pass fails, the impls the sources
    declare fill in; the measured runs then report the failure."""
    impls: list[str] = []
    proc = subprocess.run([str(binary), name, "--n", "1"], capture_output=True, text=True, timeout=600)
    for text in proc.stdout.splitlines():
        line = parse_line(text)
        if line.get("workload") == name and line.get("impl") and line["impl"] not in impls:
            impls.append(line["impl"])
    if proc.returncode != 0:
        pattern = re.compile(r'Workload\(\s*name:\s*"([^"]+)",\s*impl:\s*"([^"]+)"')
        for source in sorted((BENCH_DIR / "Sources" / PRODUCT).glob("*.swift")):
            for m in pattern.finditer(source.read_text()):
                if m.group(1) == name and m.group(2) not in impls:
                    impls.append(m.group(2))
    # Corral first, then the baselines in the order the program runs them.
    return sorted(impls, key=lambda impl: impl != "corral")


# ---------------------------------------------------------------------------
# Measuring

BUSY_THRESHOLD = 0.25  # share of all CPUs that other processes may keep busy before a run
quiet_stats = {"runs": 0, "busy": 0, "waited_s": 0.0}


def cpu_busy(interval: float = 0.3) -> float:
    """Share of all CPUs busy during `interval` seconds (from /proc/stat; 0 if unreadable)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_wait: float) -> None:
    """Before a measured run: wait (up to max_wait s) while other processes keep the CPUs
    busy, since a busy core skews the figures; count the runs that started busy anyway."""
    quiet_stats["runs"] += 1
    if max_wait <= 0:
        quiet_stats["unchecked"] = 1
        return
    start = time.monotonic()
    busy = cpu_busy()
    announced = False
    while busy > BUSY_THRESHOLD and time.monotonic() - start < max_wait:
        if not announced:
            log(f"  (CPUs {busy:.0%} busy with other work; waiting up to {max_wait:.0f} s)")
            announced = True
        time.sleep(1.0)
        busy = cpu_busy()
    quiet_stats["waited_s"] += time.monotonic() - start
    if busy > BUSY_THRESHOLD:
        quiet_stats["busy"] += 1
        log(f"  (running anyway with the CPUs {busy:.0%} busy)")


def run_once(cmd: list[str], name: str, impl: str, round_: int, timeout: float,
             series: Series, failures: list[Failure], quiet_wait: float) -> None:
    wait_until_quiet(quiet_wait)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        failures.append(Failure(name, impl, round_, f"timed out after {timeout:.0f} s"))
        series.failed = True
        log(f"  {impl:<12} TIMEOUT after {timeout:.0f} s")
        return
    seconds = time.monotonic() - start
    found = None
    for text in proc.stdout.splitlines():
        line = parse_line(text)
        if line.get("workload") == name and line.get("impl") == impl:
            found = line
            series.raw.append(text.strip())
    if proc.returncode != 0 or found is None:
        detail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"
        why = f"exit status {proc.returncode}" if proc.returncode != 0 else "no result line"
        failures.append(Failure(name, impl, round_, f"{why}: {detail}"))
        series.failed = True
        log(f"  {impl:<12} FAILED ({why}): {detail}")
        return
    series.lines.append(found)
    figures = " ".join(f"{m.field}={found.get(m.field, '?')}" for m in METRICS.get(name, [NS_PER_OP]))
    log(f"  {impl:<12} {figures}  ({seconds:.1f} s)")


def measure(name: str, go_bin: Path | None, corral_bin: Path, impls: list[str], rounds: int,
            n: int | None, timeout: float, quiet_wait: float,
            failures: list[Failure]) -> dict[str, Series]:
    series: dict[str, Series] = {}
    plan: list[tuple[str, list[str]]] = []
    if go_bin is not None:
        plan.append(("go", [str(go_bin), name] + ([str(n)] if n else [])))
    for impl in impls:
        plan.append((impl, [str(corral_bin), name, "--impl", impl] + (["--n", str(n)] if n else [])))
    for impl, _ in plan:
        series[impl] = Series(name, impl)
    for r in range(1, rounds + 1):
        log(f"{name}: round {r}/{rounds}")
        for impl, cmd in plan:
            if series[impl].failed:
                continue  # a failed check fails again; don't spend the time
            run_once(cmd, name, impl, r, timeout, series[impl], failures, quiet_wait)
    return series


# ---------------------------------------------------------------------------
# Machine and versions


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    core_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    return f"{cpu}, {core_text}, {platform.system()} {platform.release()}"


def go_version(go_bin: Path | None) -> str:
    if go_bin is not None:
        text = first_line(["go", "version", str(go_bin)])  # the version the binary was built with
        m = re.search(r"\bgo\d+(\.\d+)*\S*", text)
        if m:
            return m.group(0)
    m = re.search(r"\bgo\d+(\.\d+)*\S*", first_line(["go", "version"]))
    return m.group(0) if m else "unknown"


def corral_revision() -> str:
    rev = first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "Package.swift", "Sources",
             "Benchmarks/Sources", "Benchmarks/Package.swift"],
            capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return rev + (" with uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------------
# Report


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    text = f"{ratio:.1f}×" if ratio >= 10 else f"{ratio:.2f}×"
    return f"**{text}**" if ratio < 1 else text


@dataclass
class Row:
    workload: str
    metric: Metric
    go: float | None
    corral: float | None
    baselines: list[tuple[str, float | None]]  # (impl, value)
    failed: set[str]

    @property
    def title(self) -> str:
        return f"{self.workload} ({self.metric.label})" if self.metric.label else self.workload

    def ratio(self, value: float | None) -> float | None:
        if value is None or self.go is None or self.go <= 0:
            return None
        return value / self.go


def make_rows(order: list[str], results: dict[str, dict[str, Series]]) -> list[Row]:
    rows = []
    for name in order:
        if name not in results:
            continue
        by_impl = results[name]
        for metric in METRICS.get(name, [NS_PER_OP]):
            def value(impl: str) -> float | None:
                s = by_impl.get(impl)
                return s.median(metric) if s else None
            baselines = [(impl, value(impl)) for impl in by_impl if impl not in ("go", "corral")]
            failed = {impl for impl, s in by_impl.items() if s.failed}
            rows.append(Row(name, metric, value("go"), value("corral"), baselines, failed))
    return rows


def cell(row: Row, impl: str, value: float | None) -> str:
    return "FAILED" if impl in row.failed else fmt(value)


def markdown_table(rows: list[Row]) -> str:
    out = [
        "| workload | Go | Corral | Swift baseline | Corral ÷ Go | baseline ÷ Go |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.baselines:
            base = "<br>".join(f"{impl}: {cell(row, impl, v)}" for impl, v in row.baselines)
            base_ratio = "<br>".join(f"{impl}: {fmt_ratio(row.ratio(v))}" for impl, v in row.baselines)
        else:
            base, base_ratio = "—", "—"
        name = f"`{row.workload}`" + (f" ({row.metric.label})" if row.metric.label else "")
        out.append(
            f"| {name} | {cell(row, 'go', row.go)} | {cell(row, 'corral', row.corral)} | {base} "
            f"| {fmt_ratio(row.ratio(row.corral))} | {base_ratio} |"
        )
    return "\n".join(out)


def write_report(path: Path, header: list[str], table: str, gaps: list[str],
                 results: dict[str, dict[str, Series]], failures: list[Failure]) -> None:
    parts = ["# Corral vs Go: standard workloads", ""]
    parts += header + ["", table, ""]
    if gaps:
        parts += ["Gaps (— in the table):", ""] + [f"- {gap}" for gap in gaps] + [""]
    if failures:
        parts += ["Failed runs:", ""] + [f"- {escape(str(f))}" for f in failures] + [""]
    parts += ["<details><summary>Spread over the rounds</summary>", "",
              "| workload | impl | runs | median | min | max | max ÷ min |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, by_impl in results.items():
        for metric in METRICS.get(name, [NS_PER_OP]):
            title = f"`{name}`" + (f" ({metric.label})" if metric.label else "")
            for impl, s in by_impl.items():
                vals = s.values(metric)
                if not vals:
                    parts.append(f"| {title} | {impl} | 0 | — | — | — | — |")
                    continue
                spread = f"{max(vals) / min(vals):.2f}" if min(vals) > 0 else "—"
                parts.append(f"| {title} | {impl} | {len(vals)} | {fmt(statistics.median(vals))} "
                             f"| {fmt(min(vals))} | {fmt(max(vals))} | {spread} |")
    parts += ["", "</details>", ""]
    parts += ["<details><summary>Every run (raw output lines)</summary>", "", "```"]
    for name, by_impl in results.items():
        for s in by_impl.values():
            parts += s.raw
    parts += ["```", "", "</details>", ""]
    path.write_text("\n".join(parts))


def write_svg(path: Path, rows: list[Row], subtitle: str) -> None:
    entries = [(row.title, row.ratio(row.corral), row) for row in rows]
    bars = [(title, r) for title, r, _ in entries if r is not None and r > 0]
    width, label_w, right_pad, top, bar_h, gap = 900, 290, 30, 78, 20, 8
    height = top + max(len(entries), 1) * (bar_h + gap) + 46
    x0, x1 = label_w, width - right_pad
    logs = [math.log2(r) for _, r in bars] or [0.0]
    lo = math.floor(min(min(logs), -1.0) - 0.25)
    hi = math.ceil(max(max(logs), 1.0) + 0.25)

    def x(ratio: float) -> float:
        return x0 + (math.log2(ratio) - lo) / (hi - lo) * (x1 - x0)

    def tick(e: int) -> str:
        return f"{2 ** e}×" if e >= 0 else f"1/{2 ** -e}×"

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
        f'Corral ÷ Go, median per workload (lower is better)</text>',
        f'<text x="{width / 2}" y="40" text-anchor="middle" fill="#555">{escape(subtitle)}</text>',
    ]
    plot_bottom = height - 36
    for e in range(lo, hi + 1):
        gx = x(2.0 ** e)
        svg.append(f'<line x1="{gx:.1f}" y1="{top - 8}" x2="{gx:.1f}" y2="{plot_bottom}" stroke="#e3e3e3"/>')
        svg.append(f'<text x="{gx:.1f}" y="{plot_bottom + 16}" text-anchor="middle" fill="#555">{tick(e)}</text>')
    svg.append(f'<text x="{(x0 + x1) / 2}" y="{plot_bottom + 32}" text-anchor="middle" fill="#555">'
               f'log scale; left of 1× Corral is faster (or smaller) than Go</text>')
    one = x(1.0)
    for i, (title, ratio, row) in enumerate(entries):
        y = top + i * (bar_h + gap)
        base_y = f"{y + bar_h * 0.72:.1f}"
        svg.append(f'<text x="{x0 - 8}" y="{base_y}" text-anchor="end" '
                   f'font-family="Menlo, Consolas, monospace">{escape(title)}</text>')
        if ratio is None or ratio <= 0:
            if {"go", "corral"} & row.failed:
                why = "check FAILED"
            elif row.go is None:
                why = "no Go reference"
            else:
                why = "no Corral implementation"
            svg.append(f'<text x="{one + 6:.1f}" y="{base_y}" fill="#888" font-style="italic">— {why}</text>')
            continue
        end = x(ratio)
        left, w = min(one, end), max(abs(end - one), 1.0)
        color = "#2e7d32" if ratio < 1 else "#d84315"
        label = f"{ratio:.1f}×" if ratio >= 10 else f"{ratio:.2f}×"
        svg.append(f'<rect x="{left:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        room = (end - x0) if ratio < 1 else (x1 - end)
        if room >= 48:  # the label fits outside the bar's end
            lx, anchor, fill = (end - 5, "end", "#222") if ratio < 1 else (end + 5, "start", "#222")
        else:  # inside the bar
            lx, anchor, fill = (end + 5, "start", "#fff") if ratio < 1 else (end - 5, "end", "#fff")
        svg.append(f'<text x="{lx:.1f}" y="{base_y}" text-anchor="{anchor}" '
                   f'fill="{fill}" font-weight="bold">{label}</text>')
    svg.append(f'<line x1="{one:.1f}" y1="{top - 12}" x2="{one:.1f}" y2="{plot_bottom}" '
               f'stroke="#000" stroke-width="1.5"/>')
    svg.append(f'<text x="{one:.1f}" y="{top - 17}" text-anchor="middle" font-weight="bold">1.0× = Go</text>')
    if not entries:
        svg.append(f'<text x="{(x0 + x1) / 2}" y="{top + 14}" text-anchor="middle">no workload ran</text>')
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n")


# ---------------------------------------------------------------------------


def busy_note() -> str:
    runs, busy = quiet_stats["runs"], quiet_stats["busy"]
    if quiet_stats.get("unchecked"):
        return "other processes' CPU use not checked (--quiet-wait 0)"
    if runs and busy:
        return (f"{busy} of {runs} runs started while other processes kept more than "
                f"{BUSY_THRESHOLD:.0%} of the CPUs busy (their figures are suspect)")
    return f"each run started with the CPUs at most {BUSY_THRESHOLD:.0%} busy" if runs else "no runs"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per workload (default 3)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these workloads")
    parser.add_argument("--n", type=int, help="override N (smoke tests; whole-run workloads keep N=1)")
    parser.add_argument("--go-bin", metavar="PATH", help="use this go-reference binary instead of building it")
    parser.add_argument("--no-build", action="store_true",
                        help="build nothing: use the existing release corral-workloads (and --go-bin)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=BENCH_DIR / "Results",
                        help="where report.md and ratios.svg go (default Benchmarks/Results)")
    parser.add_argument("--shared", metavar="DIR", type=Path, default=DEFAULT_SHARED,
                        help=f"the folder with WORKLOADS.md and go-reference/ (default {DEFAULT_SHARED})")
    parser.add_argument("--quiet-wait", metavar="SECONDS", type=float, default=120,
                        help="before each run, wait up to this long while other processes keep more "
                             f"than {BUSY_THRESHOLD * 100:.0f}%% of the CPUs busy (default 120; 0: don't check)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one process may run (default 900)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")

    spec = read_workloads(args.shared / "WORKLOADS.md")
    only = [w.strip() for w in args.only.split(",") if w.strip()] if args.only else None
    if only:
        unknown = [w for w in only if w not in spec]
        if unknown:
            parser.error(f"not in WORKLOADS.md: {', '.join(unknown)} (known: {' '.join(spec)})")

    tmp: list[Path] = []
    try:
        go_bin = build_go(args.shared, args.go_bin, not args.no_build, tmp)
        go = go_version(go_bin)  # before a temporary build folder goes away
        corral_bin = build_corral(not args.no_build)
        go_names, corral_names = listed_workloads(go_bin), listed_workloads(corral_bin)

        started = datetime.datetime.now().astimezone()
        load_before = os.getloadavg()
        results: dict[str, dict[str, Series]] = {}
        gaps: list[str] = []
        failures: list[Failure] = []
        for name in spec:
            if only and name not in only:
                continue
            has_go, has_corral = name in go_names, name in corral_names
            if not has_go and not has_corral:
                gaps.append(f"`{name}`: implemented by neither side (not in the table)")
                continue
            impls = corral_impls(corral_bin, name) if has_corral else []
            if not has_go:
                gaps.append(f"`{name}`: no Go reference implementation")
            if not impls:
                gaps.append(f"`{name}`: no Corral implementation in `corral-workloads`")
            elif "corral" not in impls:
                gaps.append(f"`{name}`: only Swift baselines ({', '.join(impls)}), no `impl=corral`")
            elif len(impls) == 1:
                gaps.append(f"`{name}`: no Swift baseline")
            results[name] = measure(name, go_bin if has_go else None, corral_bin, impls,
                                    args.rounds, args.n, args.timeout, args.quiet_wait, failures)
        if not only:
            extra = sorted((go_names | corral_names) - set(spec))
            for name in extra:
                gaps.append(f"`{name}`: not in WORKLOADS.md, so not compared")
        load_after = os.getloadavg()
    finally:
        for folder in tmp:
            shutil.rmtree(folder, ignore_errors=True)

    rows = make_rows(spec, results)
    table = markdown_table(rows)
    swift = first_line(["swift", "--version"])
    header = [
        f"Generated {started:%Y-%m-%d %H:%M %Z} by `python3 Benchmarks/perf-report.py"
        f"{f' --rounds {args.rounds}' if args.rounds != 3 else ''}"
        f"{f' --only {args.only}' if args.only else ''}{f' --n {args.n}' if args.n else ''}`.",
        "",
        f"- Machine: {machine_description()}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; {busy_note()}",
        f"- Swift: {swift}; Go: {go}; Corral at {corral_revision()}",
        f"- Median of {args.rounds} round{'s' if args.rounds != 1 else ''}, each running Go, then Corral, "
        "then the Swift baselines, one process at a time. Figures are ns per operation unless "
        "the workload names another unit; ratios below 1 (bold) mean Corral, or the baseline, "
        "beats Go.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / "report.md", header, table, gaps, results, failures)
    write_svg(args.out / "ratios.svg", rows,
              f"{started:%Y-%m-%d}, {machine_description()}, {swift.split('(')[0].strip()}, Go {go}, "
              f"median of {args.rounds}")

    print(table)
    for gap in gaps:
        print(f"- {gap}")
    log(f"perf-report: wrote {args.out / 'report.md'} and {args.out / 'ratios.svg'}")
    if failures:
        for failure in failures:
            log(f"perf-report: FAILED: {failure}")
        failed_names = sorted({f.workload for f in failures})
        log(f"perf-report: check failed in {', '.join(failed_names)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
