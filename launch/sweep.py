r"""Hyperparameter sweeps on one machine: one `python -m lm.main` run per point, N at a time.

    python -m launch.sweep experiments/shakespeare_gpt.py --workdir workdirs/gpt_sweep
    python -m launch.sweep experiments/shakespeare_gpt.py:tiny --workdir /tmp/sweep --parallel 2 \
        --config.train.steps=10          # passed to every point
    python -m launch.sweep experiments/shakespeare_gpt.py --workdir /tmp/sweep --dry_run
    python -m launch.sweep experiments/gpt2.py --compile_only --topology cpu:8  # will each fit?

The experiment file's `get_sweep(arg)` returns a list of override dicts mapping dotted config keys
to values (build them with `lm.config.sweep_axis`, `sweep_product` and `sweep_zip`); the `:arg`
goes to both `get_sweep` and `get_config`. Every key is checked against `get_config(arg)`, and
every point's command line is parsed here exactly as `lm.main` will parse it, before anything
runs.

Each point trains in ROOT/<name>, where the name is made from its overrides
("learning_rate=0.001,d_model=128") unless the point has a "name" key; its output goes to
ROOT/<name>/sweep.log. A point whose metrics.jsonl already has a row at its final step
(train.steps) is skipped; an unfinished one is started again and resumes from its checkpoint.
A failed point (non-zero exit) does not stop the others; the sweep exits with status 1 at the
end. ROOT/results.csv and ROOT/results.md hold one row per point (overrides, status, final
step, the last logged value of each metric), sorted by --metric.

Ctrl-C (or SIGTERM) sends SIGTERM to the running points, which save a checkpoint and stop;
the table is written for what has finished, and rerunning the command continues the sweep.

With --compile_only --topology T every point is compiled for T by `python -m lm.main
compile` instead (nothing trains, no workdir is needed): one table of whether each fits, its
memory per device, FLOPs, step time at peak and MFU ceiling (ROOT/compile.md and
compile.json with --workdir); exit status 1 if any point does not fit or fails to compile.

This module runs `python -m lm.main` and imports no training code (lm.config only for the
sweep helpers and to read configs).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from lm import storage

DEFAULT_METRIC = "eval/loss"
# Metrics shown in results.md when present (results.csv has every logged metric).
TABLE_METRICS = ("loss", "eval/loss", "eval/perplexity", "eval/bits_per_byte", "eval/accuracy")
NAME_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]+")
MAX_NAME = 120


class SweepError(ValueError):
    """Bad sweep input: reported as one line, exit status 2."""


@dataclasses.dataclass
class Point:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, without "name"
    flags: list[str]  # --config.KEY=VALUE for the overrides and the extra flags
    steps: int | None  # the final step (train.steps) of the resolved config, None if unknown


# ------------------------------------------------------------------------- the experiment


def split_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """'experiments/x.py:arg' -> ('experiments/x.py', ('arg',)); no colon -> no argument
    (as ml_collections' config_flags calls get_config)."""
    path, *arg = spec.split(":", 1)
    return path, tuple(arg)


def load_experiment(spec: str):
    """The experiment module of 'path.py[:arg]', imported from its path, and the arg tuple."""
    path, arg = split_spec(spec)
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"no experiment file {path!r}")
    name = "sweep_experiment_" + re.sub(r"\W", "_", file.stem)
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SweepError(f"{path} has no get_config(arg)")
    return module, arg


def get_points(module, arg: tuple[str, ...], path: str) -> list[dict[str, Any]]:
    if not hasattr(module, "get_sweep"):
        raise SweepError(
            f"{path} has no get_sweep(arg): add one that returns a list of override dicts "
            "(see lm.config.sweep_product)"
        )
    try:
        points = module.get_sweep(*arg)
    except ValueError as e:  # e.g. an unknown experiment arg: the file's own one-line message
        raise SweepError(f"{path}: {e}") from None
    if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
        raise SweepError(
            f"{path}: get_sweep({', '.join(map(repr, arg))}) must return a list of dicts, "
            f"got {points!r}"
        )
    if not points:
        raise SweepError(f"{path}: get_sweep({', '.join(map(repr, arg))}) returned no points")
    return [dict(p) for p in points]


def config_keys(config) -> dict[str, Any]:
    """Dotted leaf keys of a ConfigDict (or nested dict) -> values."""
    values = config.to_dict() if hasattr(config, "to_dict") else config
    out: dict[str, Any] = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                out[key] = v

    walk("", values)
    return out


def check_keys(keys, valid: dict[str, Any], where: str) -> None:
    """Raises SweepError naming a key that is not a leaf of the config, with the valid keys
    of its section (or the sections) and close matches."""
    for key in keys:
        if key in valid:
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in valid if section and k.startswith(section + "."))
        if siblings:
            choices = siblings
        else:
            choices = sorted({k.split(".", 1)[0] for k in valid})
            if any(k.startswith(key + ".") for k in valid):
                raise SweepError(
                    f"{where}: {key!r} is a config section, not a key; sweep its keys "
                    f"({', '.join(k for k in sorted(valid) if k.startswith(key + '.'))})"
                )
        close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.8)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        label = f"keys of {section!r}" if siblings else "sections"
        raise SweepError(
            f"{where}: unknown config key {key!r}{hint}; valid {label}: {', '.join(choices)}"
        )


# ---------------------------------------------------------------- values on the command line


def format_value(value: Any, key: str = "value") -> str:
    """A value as ml_collections' `--config.KEY=VALUE` parsing reads it back (parsed by the
    type of the config field: float, int, bool, str or tuple)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float ('inf', 'nan' too)
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        items = [format_value(v, key) if not isinstance(v, str) else repr(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    raise SweepError(
        f"{key}: cannot pass a {type(value).__name__} ({value!r}) on the command line; "
        "use a bool, int, float, str or tuple"
    )


def override_flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={format_value(v, k)}" for k, v in overrides.items()]


def parse_override_flag(flag: str) -> tuple[str, str]:
    """'--config.a.b=v' -> ('a.b', 'v')."""
    m = re.fullmatch(r"--config\.([^=\s]+)=(.*)", flag, flags=re.S)
    if not m:
        raise SweepError(f"{flag!r}: overrides are written --config.KEY=VALUE")
    return m.group(1), m.group(2)


def resolve_config(spec: str, flags: list[str], where: str = "") -> dict[str, Any]:
    """The config that `python -m lm.main --config SPEC FLAGS...` trains with, parsed by the same
    ml_collections flag code (a bad value or type is an error here, before anything runs)."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    argv = ["lm.main", f"--config={spec}", *flags]
    flag_values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except (absl_flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
        raise SweepError(f"{where or spec}: {e}") from None
    return holder.value.to_dict()


def target_steps(values: dict[str, Any]) -> int | None:
    """The step a finished run has logged: train.steps (ICL experiments have it too)."""
    train = values.get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    return steps if isinstance(steps, int) else None


# ---------------------------------------------------------------------------------- names


def name_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(name_value(v) for v in value) or "empty"
    if isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return NAME_CHARS.sub("-", text).strip("-") or "empty"


def short_keys(keys) -> dict[str, str]:
    """Each dotted key -> its shortest dotted suffix that no other key ends with
    ('optimizer.learning_rate' -> 'learning_rate'; 'model.vocab_size' stays whole beside
    'data.vocab_size')."""
    keys = list(dict.fromkeys(keys))
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
                break
        out[key] = suffix
    return out


def _digest(overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def point_names(points: list[dict[str, Any]]) -> list[str]:
    """A workdir name per point: 'key=value,...' of its overrides with short keys, or its
    "name" entry. Deterministic, filesystem-safe and unique (colliding or overlong names get a
    hash of their overrides appended)."""
    shorts = short_keys(k for p in points for k in p if k != "name")
    names, explicit = [], []
    for i, point in enumerate(points):
        if "name" in point:
            name = point["name"]
            if not isinstance(name, str) or not name or NAME_CHARS.search(name) or name[0] in ".-":
                raise SweepError(
                    f"point {i}: name {name!r} is not a plain file name (letters, digits and "
                    "._=,+- only, not starting with '.' or '-')"
                )
            explicit.append(True)
        else:
            parts = [f"{shorts[k]}={name_value(v)}" for k, v in point.items()]
            name = ",".join(parts) or "default"
            if len(name) > MAX_NAME:
                name = name[: MAX_NAME - 7] + "-" + _digest(point)
            explicit.append(False)
        names.append(name)
    counts = collections.Counter(names)
    for i, point in enumerate(points):
        if counts[names[i]] > 1:
            if explicit[i]:
                raise SweepError(f"two points are named {names[i]!r}")
            names[i] = f"{names[i][: MAX_NAME - 7]}-{_digest(point)}"
    counts = collections.Counter(names)
    dupes = [n for n, c in counts.items() if c > 1]
    if dupes:
        same = [i for i, n in enumerate(names) if n == dupes[0]]
        raise SweepError(f"points {same} have the same overrides ({points[same[0]]})")
    return names


# ------------------------------------------------------------------------------- the plan


def plan_sweep(spec: str, extra_flags: list[str] = ()) -> list[Point]:
    """The points of the experiment's sweep, checked and resolved (nothing runs)."""
    module, arg = load_experiment(spec)
    path = split_spec(spec)[0]
    points = get_points(module, arg, path)
    valid = config_keys(module.get_config(*arg))
    extra = [parse_override_flag(f) for f in extra_flags]
    check_keys([k for k, _ in extra], valid, "--config override")
    swept = {k for p in points for k in p if k != "name"}
    both = sorted(swept & {k for k, _ in extra})
    if both:
        raise SweepError(
            f"--config.{both[0]} is swept by get_sweep; it cannot also be set for every point"
        )
    for i, p in enumerate(points):
        check_keys([k for k in p if k != "name"], valid, f"sweep point {i} {p}")
    names = point_names(points)
    planned = []
    for name, p in zip(names, points, strict=True):
        overrides = {k: v for k, v in p.items() if k != "name"}
        flags = override_flags(overrides) + list(extra_flags)
        values = resolve_config(spec, flags, f"sweep point {name}")
        planned.append(
            Point(name=name, overrides=overrides, flags=flags, steps=target_steps(values))
        )
    return planned


def command(spec: str, root: pathlib.Path, point: Point) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lm.main",
        f"--config={spec}",
        f"--workdir={root / point.name}",
        *point.flags,
    ]


# ------------------------------------------------------------------------- workdir reading


def read_metrics(workdir: storage.PathLike) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl ([] if none; a torn last line is ignored)."""
    path = storage.as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def final_metrics(rows: list[dict[str, Any]]) -> tuple[int | None, dict[str, Any]]:
    """(the last logged step, {metric: its value in the last row that has it})."""
    step = None
    metrics: dict[str, Any] = {}
    for row in rows:
        if "step" in row:
            step = row["step"]
        metrics.update({k: v for k, v in row.items() if k != "step"})
    return step, metrics


def is_finished(workdir: pathlib.Path, steps: int | None) -> bool:
    """True if the workdir's metrics.jsonl has a row at the run's final step."""
    if steps is None:
        return False
    return any(row.get("step") == steps for row in read_metrics(workdir))


# -------------------------------------------------------------------------------- running


def run_points(
    spec: str,
    root: pathlib.Path,
    points: list[Point],
    parallel: int,
    codes: dict[str, int] | None = None,
) -> dict[str, int]:
    """Runs the points as subprocesses, `parallel` at a time; -> {name: exit status} (also
    filled into `codes` as they end). On KeyboardInterrupt the running points get SIGTERM (they
    checkpoint and stop) and the interrupt is raised again once they have ended."""
    queue = collections.deque(points)
    running: dict[subprocess.Popen, tuple[Point, float, Any]] = {}
    codes = {} if codes is None else codes
    total = len(points)
    done = 0

    def start(point):
        workdir = root / point.name
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(log_path(root, point), "a")  # noqa: SIM115 - closed when the process ends
        cmd = command(spec, root, point)
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        # Own session: a Ctrl-C in the terminal reaches the sweep, which stops the points cleanly.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        running[proc] = (point, time.monotonic(), log)
        print(f"start {point.name} (log: {log_path(root, point)})", flush=True)

    try:
        while queue or running:
            while queue and len(running) < parallel:
                start(queue.popleft())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                point, began, log = running.pop(proc)
                log.close()
                upload_log(root, point)
                codes[point.name] = proc.returncode
                done += 1
                took = time.monotonic() - began
                if proc.returncode == 0:
                    print(f"[{done}/{total}] done {point.name} in {took:.0f} s", flush=True)
                else:
                    print(
                        f"[{done}/{total}] FAILED {point.name} (exit {proc.returncode}) after {took:.0f} s; "
                        f"log: {log_path(root, point)}",
                        flush=True,
                    )
    except KeyboardInterrupt:
        print(
            f"interrupted: stopping {len(running)} running point(s) (they save a checkpoint)",
            flush=True,
        )
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc, (point, _, log) in running.items():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            upload_log(root, point)
            codes[point.name] = proc.returncode
        raise
    return codes


def log_path(root: storage.PathLike, point: Point) -> pathlib.Path:
    """Where a point's output goes while it runs: ROOT/NAME/sweep.log for a local root; for a
    bucket (no appends there) a local file, copied into ROOT/NAME/sweep.log when the point ends."""
    if not storage.is_remote(root):
        return pathlib.Path(root) / point.name / "sweep.log"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    local = pathlib.Path(tempfile.gettempdir()) / f"lm-sweep-{digest}" / f"{point.name}.log"
    local.parent.mkdir(parents=True, exist_ok=True)
    return local


def upload_log(root: storage.PathLike, point: Point) -> None:
    if storage.is_remote(root):
        storage.write_atomic(
            storage.as_path(root) / point.name / "sweep.log", log_path(root, point).read_bytes()
        )


# -------------------------------------------------------------------------------- results


def point_status(workdir: pathlib.Path, steps: int | None, code: int | None) -> str:
    if code not in (None, 0):
        return f"failed (exit {code})"
    if is_finished(workdir, steps):
        return "finished"
    if code == 0 or read_metrics(workdir):
        return "unfinished"
    return "not started"


def collect_results(
    root: pathlib.Path, points: list[Point], codes: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """One row per point: name, its overrides, status, final step, final metrics, log path."""
    codes = codes or {}
    rows = []
    for point in points:
        workdir = storage.as_path(root) / point.name
        step, metrics = final_metrics(read_metrics(workdir))
        rows.append(
            {
                "name": point.name,
                "overrides": dict(point.overrides),
                "status": point_status(workdir, point.steps, codes.get(point.name)),
                "step": step,
                "metrics": metrics,
                "log": str(workdir / "sweep.log"),
            }
        )
    return rows


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def sort_results(
    rows: list[dict[str, Any]], metric: str, mode: str = "min"
) -> list[dict[str, Any]]:
    """By `metric` (mode 'min' or 'max'); points without it (or with NaN) last, in sweep order."""
    if mode not in ("min", "max"):
        raise SweepError(f"--mode must be min or max, not {mode!r}")

    def key(row):
        v = _number(row["metrics"].get(metric))
        return (1, 0.0) if v is None else (0, v if mode == "min" else -v)

    return sorted(rows, key=key)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def table_columns(rows, metric: str) -> tuple[list[str], list[str]]:
    """(override keys, metrics for results.md) in a stable order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    present = {m for r in rows for m in r["metrics"]}
    metrics = [m for m in dict.fromkeys((metric, *TABLE_METRICS)) if m in present or m == metric]
    return keys, metrics


def markdown_table(rows, metric: str) -> str:
    keys, metrics = table_columns(rows, metric)
    header = ["name", *keys, "status", "step", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        status = r["status"] + (f", log: {r['log']}" if r["status"].startswith("failed") else "")
        cells = [
            r["name"],
            *(format_value(r["overrides"][k]) if k in r["overrides"] else "" for k in keys),
            status,
            _cell(r["step"]),
            *(_cell(r["metrics"].get(m)) for m in metrics),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_results(root: storage.PathLike, rows, metric: str) -> str:
    """Writes ROOT/results.csv (every metric) and ROOT/results.md; returns the Markdown table."""
    root = storage.as_path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys, _ = table_columns(rows, metric)
    all_metrics = sorted({m for r in rows for m in r["metrics"]}, key=lambda m: (m != metric, m))
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *keys, "status", "step", *all_metrics, "log"])
        for r in rows:
            writer.writerow(
                [
                    r["name"],
                    *(format_value(r["overrides"][k]) if k in r["overrides"] else "" for k in keys),
                    r["status"],
                    "" if r["step"] is None else r["step"],
                    *("" if r["metrics"].get(m) is None else r["metrics"][m] for m in all_metrics),
                    r["log"],
                ]
            )
        storage.write_atomic(root / "results.csv", f.getvalue())
    table = markdown_table(rows, metric)
    storage.write_atomic(root / "results.md", f"Sweep results, sorted by {metric}.\n\n{table}\n")
    return table


# ------------------------------------------------------------------------ compile only


def compile_command(spec: str, topology: str, point: Point, memory_gib: float = 0.0) -> list[str]:
    memory = [f"--device_memory_gib={memory_gib}"] if memory_gib else []
    return [
        sys.executable,
        "-m",
        "lm.main",
        "compile",
        f"--config={spec}",
        f"--topology={topology}",
        "--json",
        *memory,
        *point.flags,
    ]


def compile_point(
    spec: str, topology: str, point: Point, memory_gib: float = 0.0
) -> dict[str, Any]:
    """One point compiled for `topology` by `python -m lm.main compile`: its report (parsed
    JSON, with 'status' 'fits', 'does not fit' or 'not judged'), or the status 'does not fit'
    / 'failed' and the command's last line of output."""
    proc = subprocess.run(
        compile_command(spec, topology, point, memory_gib),
        capture_output=True,
        text=True,
        check=False,
    )
    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    report: dict[str, Any] = {"name": point.name, "overrides": point.overrides}
    start = proc.stdout.find("{")
    if start >= 0:  # a report, printed before a does-not-fit exit too
        report.update(json.loads(proc.stdout[start:]))
    if proc.returncode == 0:
        report["status"] = {True: "fits", None: "not judged"}[report["fits"]]
    elif "does not fit" in last:
        report["status"], report["error"] = "does not fit", last.removeprefix("error: ")
    else:
        report["status"], report["error"] = "failed", last.removeprefix("error: ")
    return report


def compile_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per point, whether it fits, GiB per device, FLOPs, step time, MFU ceiling."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    header = ["name", *keys, "status", "GiB per device", "temporaries GiB", "FLOPs per step"]
    header += ["step ms at peak", "MFU ceiling", "compile s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        train = r.get("train")
        cells = [r["name"], *(format_value(r["overrides"].get(k, "")) for k in keys)]
        cells.append(r["status"] + (f": {r['error']}" if "error" in r else ""))
        if train is None:
            cells += [""] * 6
        else:
            total = max(train["total"], r["eval"]["total"], r["init"]["total"])
            cells += [
                f"{total / 2**30:.2f}",
                f"{train['temporaries'] / 2**30:.2f}",
                f"{r['model_flops']:.3e}",
                f"{r['step_seconds'] * 1e3:.0f}" if r["step_seconds"] else "",
                f"{100 * r['mfu_ceiling']:.0f}%",
                f"{r['compile_seconds']:.0f}",
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def compile_sweep(
    spec: str, points: list[Point], topology: str, root, parallel: int, memory_gib: float = 0.0
) -> int:
    """Compiles every point for `topology` (nothing is trained), prints one table and writes
    ROOT/compile.md and ROOT/compile.json when a root is given. 0 if every point fits (or
    compiled where fitting is not judged), else 1."""
    import concurrent.futures

    print(f"compiling {len(points)} points for {topology} ({parallel} at a time)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        rows = list(pool.map(lambda p: compile_point(spec, topology, p, memory_gib), points))
    table = compile_table(rows)
    print(f"\n{table}", flush=True)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(root / "compile.json", json.dumps(rows, indent=2) + "\n")
        storage.write_atomic(root / "compile.md", f"{spec} compiled for {topology}.\n\n{table}\n")
        print(f"\nwrote {root / 'compile.md'} and {root / 'compile.json'}", flush=True)
    return 0 if all(r["status"] in ("fits", "not judged") for r in rows) else 1


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        description="Run an experiment's get_sweep() points with python -m lm.main, N at a time. "
        "Extra --config.KEY=VALUE flags are passed to every point.",
    )
    parser.add_argument(
        "experiment", help="experiments/NAME.py[:arg]; the arg goes to get_sweep and get_config"
    )
    parser.add_argument(
        "--workdir",
        help="sweep root: one workdir per point, results.csv/.md (optional with --compile_only)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="sort the table by this metric")
    parser.add_argument(
        "--mode", choices=("min", "max"), default="min", help="min: lower is better"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile every point for --topology and print one table (fits, GiB per device, "
        "FLOPs, MFU ceiling); nothing is trained",
    )
    parser.add_argument(
        "--topology", help="with --compile_only: v5p:4x4x4, v5e:2x2, cpu:8, ... (lm.main compile)"
    )
    parser.add_argument(
        "--device_memory_gib",
        type=float,
        default=0.0,
        help="with --compile_only: memory per device to judge 'fits' by (lm.main compile)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.compile_only and not args.topology:
        parser.error("--compile_only needs --topology (e.g. v5p:4x4x4 or cpu:8)")
    if args.topology and not args.compile_only:
        parser.error("--topology is for --compile_only")
    if not (args.workdir or args.compile_only):
        parser.error("--workdir is required (it is optional only with --compile_only)")
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    root = storage.as_path(args.workdir) if args.workdir else None
    if root is not None:
        storage.check_reachable(root)
    points = plan_sweep(args.experiment, extra)
    if args.compile_only:
        if args.dry_run:
            for p in points:
                command_line = compile_command(
                    args.experiment, args.topology, p, args.device_memory_gib
                )
                print(shlex.join(command_line))
            return 0
        return compile_sweep(
            args.experiment, points, args.topology, root, args.parallel, args.device_memory_gib
        )
    finished = [p for p in points if is_finished(root / p.name, p.steps)]
    todo = [p for p in points if p not in finished]
    print(
        f"sweep {args.experiment}: {len(points)} points, {len(finished)} finished, {len(todo)} to run"
        f"{f' ({args.parallel} at a time)' if todo else ''}",
        flush=True,
    )
    for p in finished:
        print(f"skip {p.name}: finished (step {p.steps})", flush=True)
    if args.dry_run:
        for p in todo:
            print(shlex.join(command(args.experiment, root, p)))
        return 0
    codes: dict[str, int] = {}
    interrupted = False
    previous = signal.signal(
        signal.SIGTERM, signal.default_int_handler
    )  # SIGTERM: stop like Ctrl-C
    try:
        run_points(args.experiment, root, todo, args.parallel, codes)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = sort_results(collect_results(root, points, codes), args.metric, args.mode)
    table = write_results(root, rows, args.metric)
    print(f"\n{table}\n\nwrote {root / 'results.csv'} and {root / 'results.md'}", flush=True)
    failed = [r for r in rows if r["status"].startswith("failed")]
    for r in failed:
        print(f"failed: {r['name']} ({r['status']}); log: {r['log']}", file=sys.stderr)
    if interrupted:
        print("interrupted: run the same command again to continue the sweep", file=sys.stderr)
        return 130
    return 1 if failed else 0


def run() -> None:
    try:
        sys.exit(main())
    except SweepError as e:
        if os.environ.get("LM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
