"""What every stage script does first, before it imports torch or anything else outside the standard library.

- A Python without the project's packages (the venv not activated, so the stage's `python` is the system one;
  or `.venv/bin/dvc` called directly) stops with one line saying how to fix it, not a ModuleNotFoundError
  traceback from deep inside an import.
- The stage ends when the process that started it does (`dvc`, or torchrun for a DDP worker): killing only
  `dvc` must not leave training running beside the next `dvc repro`. On Linux the kernel sends SIGTERM
  (prctl PR_SET_PDEATHSIG); elsewhere a watchdog thread polls the parent. SIGTERM then exits through Python,
  so atomic_dir and atomic_file remove their temporary outputs.
  DVC runs `cmd` through `$SHELL -c`, or `/bin/sh -c` when SHELL is unset (CI, cron, containers). bash execs
  the command, so the stage's parent is dvc; dash forks, so the parent is a shell that outlives a killed dvc.
  When the parent is a shell, a watchdog thread also watches the shell's parent (Linux /proc).

Standard library only: this module must import where nothing else does.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

# Import names of the packages the stages need (pyproject.toml's dependencies); find_spec imports none of them.
REQUIRED = ("torch", "torchvision", "numpy", "yaml", "PIL", "matplotlib", "tqdm", "dvclive")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


_stopped_by: int | None = None  # the signal that asked this process to stop, once one has


def _terminate(signum: int, frame) -> None:
    global _stopped_by
    _stopped_by = signum
    raise _stop_exception(signum)  # through Python: `finally` and the atomic writers' cleanup run


def _stop_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def raise_if_stopped() -> None:
    """Raise again the stop a signal asked for, if one did. Python runs a signal's handler wherever the main
    thread is, and an exception raised inside a __del__ or a garbage-collector callback is printed and dropped
    ("Exception ignored in ..."): a training loop with no end of its own then went on after Ctrl-C. Loops call
    this once an epoch."""
    if _stopped_by is not None:
        raise _stop_exception(_stopped_by)


def handle_stop_signals() -> None:
    """SIGTERM (a cancelled Slurm job, `kill`) a clean exit as Ctrl-C is, and both remembered for
    raise_if_stopped."""
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller ignores Ctrl-C
        signal.signal(signal.SIGINT, _terminate)


# A parent with one of these names is the `sh -c` that DVC ran `cmd` through, not the process that owns the stage.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox"})


def _parent_of(pid: int) -> int | None:
    """`pid`'s parent from /proc (Linux), None when `pid` is gone or there is no /proc."""
    try:
        # The command name is in parentheses and may hold spaces or ")": the fields after the last ") " are fixed.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _watch_parent(parent: int, owner: int | None) -> None:
    """SIGTERM this process once its parent is gone or, when the parent is a shell started by `owner`, once the
    shell's parent is no longer `owner` (the kernel hands an orphaned shell to init or a subreaper)."""
    while os.getppid() == parent and (owner is None or _parent_of(parent) == owner):
        time.sleep(WATCHDOG_PERIOD_S)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_with_parent() -> None:
    """Make SIGTERM a clean exit and send it to this process when its parent, or the process that started the
    parent shell, dies."""
    parent = os.getppid()
    handle_stop_signals()
    owner = _parent_of(parent) if _command_name(parent) in SHELLS else None  # who started the shell
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                _terminate(signal.SIGTERM, None)
            if owner is None:
                return  # the kernel watches the parent; nothing else to watch
    threading.Thread(target=_watch_parent, args=(parent, owner), daemon=True, name="exit-with-parent").start()


def _exit_if_packages_missing(what: str) -> None:
    missing = missing_packages()
    if missing:
        print(f"error: {what}: this Python ({sys.executable}) lacks {', '.join(missing)}, the project's "
              "dependencies. Activate the project's environment first: `source .venv/bin/activate` (`make install` "
              "creates it), then run again.", file=sys.stderr)
        sys.exit(2)


def start_stage() -> None:
    """Call first in every stage script, before any other import of the project."""
    _exit_if_packages_missing(os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "this stage")
    exit_with_parent()


def start_command() -> None:
    """Call first in `attention-cnn`: a stage's start, with SIGTERM (a cancelled Slurm job, `kill`) a clean exit
    as Ctrl-C is. It ends with its parent only as a torchrun worker, whose parent is the torchrun in the command
    that started it: a user's own command may outlive its shell on purpose (nohup, disown), unlike a stage, which
    belongs to the dvc that started it."""
    _exit_if_packages_missing("attention-cnn")
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # distributed.inside_torchrun, without torch
        exit_with_parent()
    else:
        handle_stop_signals()
