"""Paths on the command line as a user types them.

Hydra's override grammar reads an unquoted value as its own syntax: a file name with ``=``,
brackets, parentheses, ``&``, ``#``, ``!``, a quote, a non-ASCII letter (``café.jpg``) or a
leading ``~`` (zsh does not expand ``key=~/x``) is a parse error, although each is an ordinary
path. ``quote_paths`` quotes the value of a path key (a leading ``~`` expanded, as a shell does)
when, and only when, Hydra cannot parse it as given, so a valid override (a sweep
``input=a.jpg,b.jpg``, an interpolation) is untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

# the last part of the keys that hold a file or folder (input, data.root, hydra.run.dir, ...)
PATH_KEYS = frozenset(
    {
        "input",
        "ckpt_path",
        "resume",
        "output_dir",
        "output",
        "root",
        "images_dir",
        "train_json",
        "val_json",
        "split_file",
        "images",
        "checkpoint",
        "weights",
        "dir",
        "root_dir",
        "data_dir",
        "log_dir",
        "save_dir",
        "default_root_dir",
    }
)


_UNPARSED = object()


def _value(parser: OverridesParser, override: str) -> object:
    """The parsed value of one override, or ``_UNPARSED`` when Hydra cannot parse it (None is
    a value: ``key=null``)."""
    try:
        return parser.parse_overrides([override])[0].value()
    except OverrideParseException:
        return _UNPARSED


def _quoted(value: str) -> str:
    """``value`` as a Hydra single-quoted string: a quote and the backslashes before it (or at
    the end) escaped, any other backslash kept as it is (Windows paths)."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def quote_paths(args: Sequence[str]) -> list[str]:
    """``args`` with each path override Hydra cannot parse (``input=/photos/a=b.jpg``) quoted
    (``input='/photos/a=b.jpg'``), so that it means the path as written; everything else as
    given (Hydra then reports what is wrong with it)."""
    parser = OverridesParser.create()
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        path_key = sep and not arg.startswith("-") and name in PATH_KEYS and value
        if path_key and _value(parser, arg) is _UNPARSED:
            # "~/x" as the shell would expand it: Hydra's own dirs (hydra.run.dir) would not
            value = os.path.expanduser(value)
            fixed = f"{key}={_quoted(value)}"
            if _value(parser, fixed) == value:
                arg = fixed
        out.append(arg)
    return out


def first_unparsable(args: Sequence[str]) -> str | None:
    """The first command-line override Hydra's grammar refuses (options like ``-m`` aside)."""
    parser = OverridesParser.create()
    return next((a for a in args if not a.startswith("-") and _value(parser, a) is _UNPARSED), None)
