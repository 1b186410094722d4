"""What every benchmark records beside its figures: the commit the code was at."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """Short HEAD commit of this checkout, marked when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=here,
                                         stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True,
                                        cwd=here, stderr=subprocess.DEVNULL).strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
