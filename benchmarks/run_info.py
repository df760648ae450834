"""What a results file records about the software that produced it (read from package metadata and git: nothing
imported), and the check that the results can be written, made before a run that takes long."""

import argparse
import importlib.util
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that the benchmarks time (those installed), and the commit
    of a deeptalk_hf run from a git checkout (its version alone does not say which code ran)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton", "deeptalk-hf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    if commit := source_commit():
        found["deeptalk-hf commit"] = commit
    return found


def source_commit() -> str | None:
    """The short commit of the checkout deeptalk_hf is found in, `+dirty` with uncommitted changes; `None` outside
    one (an installed wheel, no git)."""
    spec = importlib.util.find_spec("deeptalk_hf")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def check_output(parser: argparse.ArgumentParser, option: str, path: str | os.PathLike, *, folder: bool) -> None:
    """Refuse (a usage error) an output the run could not write at its end: a folder named as the file, a file named
    as the folder, one under a file or in a folder without write permission."""
    path = Path(path).absolute()
    if path.is_file() if folder else path.is_dir():
        parser.error(f"{option} {path} is a {'file' if folder else 'folder'}; name a {'folder' if folder else 'file'}")
    existing = next(p for p in ([path, *path.parents] if folder else path.parents) if p.exists())
    if not existing.is_dir():
        parser.error(f"{option} {path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        parser.error(f"{option} {path} cannot be written: no permission to write in {existing}")
