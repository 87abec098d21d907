"""What every launcher shares: the `-- <lm.main args>` split, shell quoting, the lm.main command,
`--restarts` after a watchdog exit.

A launcher's own options come before `--`; everything after it is passed to
`python -m lm.main` unchanged, then the launcher appends the multi-host flags it owns
(`--config.parallel.*`). Launchers only build and run that command line; they import no
training code.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence

SEPARATOR = "--"
DISTRIBUTED = "--config.parallel.distributed=True"
COORDINATOR = "--config.parallel.coordinator_address"
NUM_PROCESSES = "--config.parallel.num_processes"
PROCESS_ID = "--config.parallel.process_id"
EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# lm.main's status when its hang watchdog fires; it must equal lm.train.watchdog.WATCHDOG_EXIT
# (tests/test_launch.py checks). Copied, not imported: launch/ imports no training code.
WATCHDOG_EXIT = 75
DEFAULT_RESTARTS = 3


class Parser(argparse.ArgumentParser):
    """argparse with `--dry_run` and the `-- <lm.main args>` convention.

    parse() returns (options, lm_args); a missing `--`, nothing after it (unless
    lm_args_optional(options) says so), or a flag the launcher sets itself is a usage error
    (message and exit status 2).
    """

    def __init__(
        self,
        prog: str,
        description: str,
        example: str,
        owned: Sequence[str] = (),
        lm_args_optional: Callable[[argparse.Namespace], bool] | None = None,
    ):
        super().__init__(
            prog=prog,
            description=description,
            usage="%(prog)s [options] -- <lm.main arguments>",
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.example = example
        self.owned = tuple(owned)
        self.lm_args_optional = lm_args_optional
        self.add_argument(
            "--dry_run",
            action="store_true",
            help="print what would run (commands, environment, scripts) and run nothing",
        )

    def parse(self, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if argv is None else argv)
        if SEPARATOR in argv:
            at = argv.index(SEPARATOR)
            own, lm_args = argv[:at], argv[at + 1 :]
        else:
            own, lm_args = argv, []
        options = self.parse_args(own)
        if not lm_args and not (self.lm_args_optional and self.lm_args_optional(options)):
            where = "nothing after `--`" if SEPARATOR in argv else "no `--`"
            self.error(f"{where}: put lm.main's arguments after `--`, e.g.\n  {self.example}")
        check_lm_args(lm_args, self.owned, self)
        return options, lm_args


def check_lm_args(
    lm_args: Sequence[str], owned: Sequence[str], parser: argparse.ArgumentParser
) -> None:
    """Usage errors for arguments that would make a broken lm.main command."""
    if any(a in ("lm.main", "lm/main.py") for a in lm_args[:3]):
        parser.error(
            "give only lm.main's arguments after `--` (the launcher adds `python -m "
            f"lm.main` itself): got {shlex.join(lm_args[:4])} ..."
        )
    for flag in owned:
        if flag_value(lm_args, flag) is not None or flag in lm_args:
            parser.error(f"{parser.prog} sets {flag} itself; remove it from the lm.main arguments")


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in an argument list (the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def workdir_of(lm_args: Sequence[str]) -> str | None:
    return flag_value(lm_args, "--workdir")


def config_name(lm_args: Sequence[str]) -> str | None:
    """'shakespeare_gpt' for `--config experiments/shakespeare_gpt.py[:arg]`."""
    config = flag_value(lm_args, "--config")
    if not config:
        return None
    stem = config.split(":", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return stem[:-3] if stem.endswith(".py") else stem


def is_url(path: str) -> bool:
    """gs://bucket/dir and the like: storage every host can reach, not a local path."""
    return bool(_URL.match(path))


def lm_command(
    lm_args: Sequence[str],
    extra: Iterable[str] = (),
    python: str = "python",
    program: str | None = None,
) -> list[str]:
    """argv of `python -m lm.main <lm_args> <extra>`; `program` replaces `python -m lm.main`."""
    head = shlex.split(program) if program else [*split_python(python), "-m", "lm.main"]
    return [*head, *lm_args, *extra]


def split_python(python: str) -> list[str]:
    """`--python "uv run python"` -> ['uv', 'run', 'python']."""
    return shlex.split(python)


def explicit_flags(coordinator: str, num_processes: int | str, process_id: int | str) -> list[str]:
    return [
        f"{COORDINATOR}={coordinator}",
        f"{NUM_PROCESSES}={num_processes}",
        f"{PROCESS_ID}={process_id}",
    ]


def quote(arg: str) -> str:
    return shlex.quote(arg)


def join(argv: Sequence[str]) -> str:
    """A shell command line that runs exactly argv."""
    return shlex.join(argv)


def quote_path(path: str) -> str:
    """Shell-quotes a path but leaves a leading `~/` to the remote shell to expand."""
    if path == "~":
        return path
    if path.startswith("~/"):
        rest = path[2:]
        return "~/" + shlex.quote(rest) if rest else "~/"
    return shlex.quote(path)


def env_prefix(env: dict[str, str]) -> str:
    """`A=1 B=2 ` for a shell line (empty for no variables)."""
    return "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())


def warn(prog: str, message: str) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr)


def add_restarts(parser: argparse.ArgumentParser) -> None:
    """`--restarts N`: how often a launcher runs lm.main again after a watchdog exit."""
    parser.add_argument(
        "--restarts",
        type=non_negative_int,
        default=DEFAULT_RESTARTS,
        metavar="N",
        help=f"when lm.main exits {WATCHDOG_EXIT} (its hang watchdog fired) run it again, "
        f"resuming from the last checkpoint, up to N times (default {DEFAULT_RESTARTS}; 0: never)",
    )


def restart_message(restart: int | str, restarts: int) -> str:
    """The line printed before each restart (`restart` may be a shell variable)."""
    return f"lm.main exited {WATCHDOG_EXIT} (watchdog: a hang); restart {restart} of {restarts}"


def restart_loop(command: str, restarts: int, one_line: bool = False) -> str:
    """POSIX shell that runs `command`, and again up to `restarts` times while it exits
    WATCHDOG_EXIT; any other status ends the shell with that status (a real error must not
    loop). The variables are prefixed so as not to meet zsh's read-only `status`."""
    if restarts == 0:
        return command
    body = [
        "lm_status=$?",
        f'if [ "$lm_status" -ne {WATCHDOG_EXIT} ] || [ "$lm_restart" -ge {restarts} ]; then '
        'exit "$lm_status"; fi',
        "lm_restart=$((lm_restart + 1))",
        f'echo "{restart_message("$lm_restart", restarts)}" >&2',
    ]
    if one_line:
        return f"lm_restart=0 && until {command}; do {'; '.join(body)}; done"
    lines = "".join(f"  {line}\n" for line in body)
    return f"lm_restart=0\nuntil {command}; do\n{lines}done"


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(0, text)


def port_number(text: str) -> int:
    """argparse type: a TCP port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value}")
    return value
