"""``--help`` as plain text that reads well at any width.

Typer's own help shows type labels (``<bool>``, ``<list[str]>``) that differ between its versions,
and wraps text wherever a line ends, including inside ``--option-names`` and in the middle of a
docstring's sentences. This formatter uses only what every Click version has (the parameters'
names, metavars, help and defaults), folds each paragraph as a whole, and never breaks a word or an
option name across lines.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

#: the left column (option names and metavar) is at most this wide; longer ones put the help below
_NAME_COLUMN = 30
_MAX_WIDTH = 100


def width() -> int:
    """The terminal's width (``COLUMNS`` when set), between 40 and 100 columns."""
    return max(40, min(shutil.get_terminal_size(fallback=(80, 24)).columns, _MAX_WIDTH))


def fill(text: str, cols: int, indent: str = "", first: str | None = None) -> str:
    """``text`` folded at word boundaries only: hyphenated words and option names stay whole."""
    glued = " ".join(text.split()).replace("[default: ", "[default:\u00a0")  # "[default: x]" stays whole
    return textwrap.fill(
        glued,
        width=max(cols, len(indent) + 20),
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ).replace("\u00a0", " ")


def paragraphs(text: str | None, cols: int, indent: str = "  ") -> list[str]:
    """A docstring as folded paragraphs (blank lines separate paragraphs; the lines within one are joined)."""
    if not text:
        return []
    out = []
    for para in text.replace("\b", "").strip().split("\n\n"):
        if para.strip():
            out.append(fill(_plain(para), cols, indent))
    return out


def _plain(text: str) -> str:
    return text.replace("\\[", "[")


def _metavar(param: Any) -> str:
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    metavar = getattr(param, "metavar", None)
    if metavar:
        return str(metavar)
    return (param.name or "value").upper()


def _default(param: Any) -> str | None:
    if getattr(param, "is_flag", False) or getattr(param, "show_default", True) is False:
        return None
    default = getattr(param, "default", None)
    if default is None or default is False or default == () or default == []:
        return None
    if callable(default):
        return None
    return str(default)


def _option_rows(params: list[Any]) -> list[tuple[str, str]]:
    rows = []
    for param in params:
        if getattr(param, "hidden", False) or getattr(param, "param_type_name", "") == "argument":
            continue
        opts = sorted(param.opts, key=lambda o: (o.startswith("--"), o))  # -b before --batch-size
        name = ", ".join(opts)
        meta = _metavar(param)
        left = f"{name} {meta}" if meta else name
        text = _plain(param.help or "")
        default = _default(param)
        if default is not None and "[default:" not in text:
            text = f"{text} [default: {default}]".strip()
        rows.append((left, text))
    return rows


def _argument_rows(params: list[Any]) -> list[tuple[str, str]]:
    return [
        (_argument_name(p), _plain(p.help or ""))
        for p in params
        if getattr(p, "param_type_name", "") == "argument" and not getattr(p, "hidden", False)
    ]


def _argument_name(param: Any) -> str:
    return str(getattr(param, "metavar", None) or param.name or "ARG").upper()


def _table(rows: list[tuple[str, str]], cols: int) -> list[str]:
    if not rows:
        return []
    column = min(max(len(left) for left, _ in rows), _NAME_COLUMN)
    indent = " " * (2 + column + 2)
    out = []
    for left, text in rows:
        if len(left) <= column:
            first = f"  {left:<{column}}  "
            out.append(fill(text, cols, indent, first=first) if text else first.rstrip())
        else:
            out.append(f"  {left}")
            if text:
                out.append(fill(text, cols, indent))
    return out


def usage(ctx: Any, command: Any) -> str:
    pieces = [ctx.command_path]
    if any(getattr(p, "param_type_name", "") == "option" for p in command.params):
        pieces.append("[OPTIONS]")
    for p in command.params:
        if getattr(p, "param_type_name", "") != "argument" or getattr(p, "hidden", False):
            continue
        name = _argument_name(p) + ("..." if getattr(p, "nargs", 1) == -1 else "")
        pieces.append(name if p.required else f"[{name}]")
    return "Usage: " + " ".join(pieces)


def command_help(ctx: Any, command: Any) -> str:
    """The whole ``memprof COMMAND --help`` text."""
    cols = width()
    lines = [usage(ctx, command), ""]
    for para in paragraphs(command.help, cols):
        lines += [para, ""]
    arguments = _argument_rows(command.get_params(ctx))
    if arguments:
        lines += ["Arguments:", *_table(arguments, cols), ""]
    lines += ["Options:", *_table(_option_rows(command.get_params(ctx)), cols)]
    if command.epilog:
        lines += ["", *paragraphs(command.epilog, cols)]
    return "\n".join(lines) + "\n"


def group_help(ctx: Any, group: Any, epilog: list[tuple[str, str]] | None = None) -> str:
    """``memprof --help``: the commands, the options, and (``epilog``) a table such as the exit codes."""
    cols = width()
    lines = [f"Usage: {ctx.command_path} [OPTIONS] COMMAND [ARGS]...", ""]
    for para in paragraphs(group.help, cols):
        lines += [para, ""]
    commands = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is not None and not getattr(cmd, "hidden", False):
            commands.append((name, cmd.get_short_help_str(limit=200)))
    lines += ["Commands:", *_table(commands, cols), ""]
    lines += ["Options:", *_table(_option_rows(group.get_params(ctx)), cols)]
    if epilog:
        lines += ["", "Exit codes:", *_table(epilog, cols)]
    return "\n".join(lines) + "\n"
