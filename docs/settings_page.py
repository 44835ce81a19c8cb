"""Write the table of every `FLTRAINING_*` setting into docs/configuration.md, from the `Settings` class.

`make docs` runs it before building the site; `--check` only says whether the page is up to date (the test
suite asks the same through `settings_table`).
"""

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo

from fltraining.settings import Settings

PAGE = Path(__file__).with_name("configuration.md")
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
MIB = 1024 * 1024


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def shown_default(value: Any) -> str:
    """A default as a person would type it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= MIB and value % MIB == 0:
        return f"{value} ({value // MIB} MiB)"
    return str(value)


def shown_values(info: FieldInfo) -> str:
    """The values a field accepts: its choices, or its type with bounds."""
    annotation = info.annotation
    choices = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    literal = next((arg for arg in choices if typing.get_origin(arg) is typing.Literal), None)
    if typing.get_origin(annotation) is typing.Literal or literal is not None:
        return ", ".join(f"`{value}`" for value in typing.get_args(literal or annotation))
    kind = next((arg for arg in choices), annotation) if isinstance(annotation, types.UnionType) else annotation
    name = {int: "integer", float: "number", bool: "`true` / `false`", str: "text", Path: "path"}.get(kind, str(kind))
    bounds = []
    for rule in info.metadata:
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(rule, getattr(annotated_types, attribute.capitalize())):
                bounds.append(f"{sign} {getattr(rule, attribute)}")
    return name + (f" ({', '.join(bounds)})" if bounds else "")


def settings_table() -> str:
    """The Markdown table of every setting: variable, default, accepted values, what it does."""
    rows = ["| variable | default | values | what it does |", "|---|---|---|---|"]
    for field, info in Settings.model_fields.items():
        description = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{env_name(field)}` | `{shown_default(info.default)}` | {shown_values(info)} | {description} |")
    return "\n".join(rows)


def with_table(page: str) -> str:
    """The page with the generated table between its markers."""
    before, start, rest = page.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{PAGE} lacks the markers {START} ... {END}")
    return f"{before}{START}\n{settings_table()}\n{END}{after}"


def main() -> None:
    """Rewrite the page's table, or with --check exit 1 when it is out of date."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    page = PAGE.read_text()
    if parser.parse_args().check:
        if with_table(page) != page:
            sys.exit(f"{PAGE} is out of date with fltraining/settings.py: run `make docs`")
        return
    PAGE.write_text(with_table(page))


if __name__ == "__main__":
    main()
