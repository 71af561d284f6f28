"""The end-to-end tests' shared start: one tiny `dvc repro` per test session, copied for each module that uses it."""

import shutil
from pathlib import Path
from typing import Callable

import pytest

from e2e import run, stages_run, tiny_repo


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory) -> Callable[[Path], Path]:
    """Returns `copy(dest)`: a private copy, at dest, of the tiny repo after its one `dvc repro` (built once).

    Each module gets its own copy because its tests change the repo (experiments, deleted outs, remotes).
    """
    template = tiny_repo(tmp_path_factory.mktemp("tiny_repo"))
    assert stages_run(run(["dvc", "repro"], template)) == ["sample", "prepare", "train", "evaluate", "visualize"]

    def copy(dest: Path) -> Path:
        shutil.rmtree(dest)  # an empty folder from tmp_path_factory; copytree wants to create it
        shutil.copytree(template, dest, symlinks=True)
        return dest

    return copy
