"""Values that reach a SLURM job: its script (``#SBATCH`` lines, the settings block the shell
reads), its task table, and the command lines built from them.

A control character in any of them is refused (:func:`text`): a newline ends the line it stands on,
so in the job script the rest of the value would become a shell command (and would end sbatch's
reading of ``#SBATCH`` lines, dropping the template's own directives after it), and in the task
table it would start another task; a tab separates the table's fields. Where a value stays, it is
quoted for whoever reads it: ``shlex.quote`` for the shell, :func:`sbatch_value` for sbatch.
"""
from __future__ import annotations

import re

from fedmpi.errors import ConfigError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters sbatch reads specially on an #SBATCH line (besides whitespace)
SBATCH_PLAIN = re.compile(r"[^\s\"'\\#]*")


def shown(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``), for a message."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def text(value, key: str) -> str:
    """``value`` (a string, or a number written as one) as a string without control characters;
    else ConfigError (exit 2) naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(key, f"must be a string, got {value!r}")
    value = str(value)
    bad = CONTROL.search(value)
    if bad:
        raise ConfigError(key, f"holds a control character ({shown(bad.group())} at position "
                               f"{bad.start()}) in '{shown(value)}'; a value of a SLURM job script "
                               f"or task table must stay on its line: remove it")
    return value


def word(value, key: str) -> str:
    """:func:`text` without whitespace either: one word of a space-separated list."""
    value = text(value, key)
    if not value or re.search(r"\s", value):
        raise ConfigError(key, f"must be one non-empty word without spaces, got {value!r}")
    return value


def check_overrides(block: str, overrides: dict) -> None:
    """The dotted keys and the strings among the values (in lists too) of ``overrides``, from
    the campaign's ``block`` (set, grid or a runs entry): every one goes into the task table."""
    def values(value):
        if isinstance(value, dict):
            for inner in value.values():
                yield from values(inner)
        elif isinstance(value, (list, tuple)):
            for inner in value:
                yield from values(inner)
        else:
            yield value

    for key, value in overrides.items():
        name = f"{block}.{shown(str(key))}"
        text(str(key), name)
        for item in values(value):
            if isinstance(item, str):
                text(item, name)


def sbatch_value(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line. sbatch splits those lines at whitespace,
    ends them at an unquoted ``#`` and takes quotes and backslashes as its own (slurm's
    src/sbatch/opt.c, _get_argument); a value with any of them goes in double quotes, with its
    ``"`` and ``\\`` escaped by a backslash."""
    if SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + re.sub(r'(["\\])', r"\\\1", value) + '"'
