"""What results record of the code that made them: the git commit of this checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(mark_uncommitted: bool = True) -> str:
    """Short HEAD commit of the checkout this package lives in (``unknown`` outside one); with
    ``mark_uncommitted``, marked when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=here,
                                         stderr=subprocess.DEVNULL).strip()
        if not mark_uncommitted:
            return commit
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True,
                                        cwd=here, stderr=subprocess.DEVNULL).strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
