"""Command-line handlers, one module per command group; ``dicomnode.cli`` parses and dispatches here.

Every handler takes the parsed arguments and returns its exit status. A configuration that
cannot be used gets the same answer from every command: ``load_config_or_exit``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dicomnode.config import Config, ConfigError, load_config

# Exit status for a configuration that cannot be used: bad input, as argparse's usage errors.
CONFIG_UNUSABLE = 2


def load_config_or_exit(path: Path | str | None, overrides: dict | None = None) -> Config:
    """The configuration at ``path`` (None: the defaults) with ``overrides``, or exit.

    Exits with status 2 after printing each problem as ``FILE: key.path: what is wrong`` on stderr.
    """
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        raise SystemExit(CONFIG_UNUSABLE) from None
