"""What every stage script does first, before it imports torch or anything else outside the standard library.

- A Python without the project's packages (the venv not activated, so the stage's `python` is the system one;
  or `.venv/bin/dvc` called directly) stops with one line saying how to fix it, not a ModuleNotFoundError
  traceback from deep inside an import.
- The stage ends when the process that started it does (`dvc`, or torchrun for a DDP worker): killing only
  `dvc` must not leave training running beside the next `dvc repro`. On Linux the kernel sends SIGTERM
  (prctl PR_SET_PDEATHSIG); elsewhere a watchdog thread polls the parent. SIGTERM then exits through Python,
  so atomic_dir and atomic_file remove their temporary outputs.

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

# Import names of the packages the stages need (pyproject.toml's dependencies); find_spec imports none of them.
REQUIRED = ("torch", "torchvision", "numpy", "yaml", "PIL", "matplotlib", "tqdm", "dvclive")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def _terminate(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # through Python: `finally` and the atomic writers' cleanup run


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_PERIOD_S)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_with_parent() -> None:
    """Make SIGTERM a clean exit and send it to this process when its parent dies."""
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _terminate)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                _terminate(signal.SIGTERM, None)
            return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def start_stage() -> None:
    """Call first in every stage script, before any other import of the project."""
    missing = missing_packages()
    if missing:
        script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "this stage"
        print(f"error: {script}: this Python ({sys.executable}) lacks {', '.join(missing)}, the project's "
              "dependencies. Activate the project's environment first: `source .venv/bin/activate` (`make install` "
              "creates it), then run again.", file=sys.stderr)
        sys.exit(2)
    exit_with_parent()
