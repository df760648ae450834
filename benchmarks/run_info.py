"""What a results file records about the software that produced it (read from package metadata: nothing imported)."""

import platform
from importlib.metadata import PackageNotFoundError, version


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that the benchmarks time (those installed)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton", "deeptalk-hf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
