"""Entry-point wrapper: a user error (bad config, path or data) ends the program with one sentence, exit code 2.

`run_app(main)` calls `absl.app.run(main)` and `run_plain(main, argv)` calls `main(argv)`; a ValueError, FileNotFoundError, KeyError, AttributeError, OSError,
ImportError or FloatingPointError escaping it is printed as `error: <sentence>` on stderr without a traceback.
Set JAXRL_TRACEBACK=1 in the environment to get the full traceback instead.
"""
from __future__ import annotations

import os
import re
import sys

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, AttributeError, OSError, ImportError, FloatingPointError)


def _root(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def sentence(e: BaseException) -> str:
    """The one sentence a user needs from `e` (config-loading errors: their root cause)."""
    if isinstance(e, OSError) and "Configuration is not available" in str(e):
        e = _root(e)
    if isinstance(e, KeyError) and e.args:
        return "config: unknown key " + str(e.args[0]).replace("\n", "; ")
    if isinstance(e, AttributeError) and str(e).strip("\"'").isidentifier():
        return (f"config: unknown key {str(e).strip(chr(34))} (the keys of each section are listed in "
                f"configs/base.py; e.g. the learning rate is optim.lr).")
    text = (str(e) or type(e).__name__).strip()
    missing = re.search(r"No such file or directory: '([^']+)'", text)
    if "Failed loading config file" in text and missing:
        return f"config file {missing.group(1)!r} does not exist."
    return text


def run_app(main) -> None:
    from absl import app

    try:
        app.run(main)
    except USER_ERRORS as e:
        if os.environ.get("JAXRL_TRACEBACK"):
            raise
        _report(e)


def _report(e: BaseException) -> None:
    print(f"error: {sentence(e)}", file=sys.stderr, flush=True)
    print("(set JAXRL_TRACEBACK=1 for the full traceback)", file=sys.stderr, flush=True)
    sys.exit(2)


def run_plain(main, argv) -> None:
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get("JAXRL_TRACEBACK"):
            raise
        _report(e)
