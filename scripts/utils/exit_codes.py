"""Exit codes shared by every script, and the wrapper that maps exceptions onto them.

0 done and gate passed; 1 unexpected failure; 2 bad arguments or bad input (file and line named);
3 refused to start (upstream manifest missing, failed, or not matching its data);
4 finished, outputs written, but the QC or significance gate failed.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_BAD_INPUT",
    "EXIT_REFUSED",
    "EXIT_GATE_FAILED",
    "Stage1Error",
    "BadInputError",
    "RefusedError",
    "run_cli",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_GATE_FAILED = 4


class Stage1Error(Exception):
    """Base class for errors that carry their own exit code."""

    exit_code = EXIT_FAILURE


class BadInputError(Stage1Error, ValueError):
    """Bad arguments or a malformed input file; the message names the file and line."""

    exit_code = EXIT_BAD_INPUT


class RefusedError(Stage1Error):
    """An upstream manifest is missing, failed its gate, or no longer matches its data."""

    exit_code = EXIT_REFUSED


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main and exit with the code it returns or the one its error carries.

    Tracebacks are kept for unexpected failures (exit 1) because those are bugs to report;
    expected refusals print one clear line instead.
    """
    try:
        code = main()
    except Stage1Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - the one place that turns any crash into exit 1
        traceback.print_exc()
        sys.exit(EXIT_FAILURE)
    sys.exit(EXIT_OK if code is None else int(code))
