"""The commit a benchmark process runs: recorded with its results, taken once when the process starts (later
commits to the checkout do not change the code it has loaded)."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """HEAD's short hash, with "+modified" when tracked files differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+modified" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")
