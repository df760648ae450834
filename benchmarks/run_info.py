"""What a results file records about the software that produced it (read from package metadata: nothing imported),
and the check that the results can be written, made before a run that takes long."""

import argparse
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that the benchmarks time (those installed)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton", "deeptalk-hf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


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
