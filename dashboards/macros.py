"""The SQL dialect of the panel files: ClickHouse SQL plus a few macros, rendered two ways.

A panel's ``.sql`` is ClickHouse SQL in which the time range, the bucket width, the tenant and
the database are macros. Grafana's ClickHouse data source knows most of them itself; the built-in
page (``analytics.dashboards_page``) binds them as ClickHouse query parameters, so no value
is ever pasted into SQL there.

=========================  ===========================================  ==========================
macro                      built-in page (bound by ClickHouse)          Grafana
=========================  ===========================================  ==========================
``$__timeFilter(expr)``    ``expr >= {from} AND expr < {to}``           the plugin's own macro
``$__dateFilter(expr)``    ``expr`` (a Date) between the range's days   the plugin's own macro
``$__timeInterval(expr)``  ``expr`` rounded down to the bucket width    the plugin's own macro
``$__interval_s``          the bucket width in seconds                  the plugin's own macro
``$__fromTime``            the range's start (DateTime, UTC)            the plugin's own macro
``$__toTime``              the range's end (DateTime, UTC)              the plugin's own macro
``$__tenantFilter(expr)``  ``expr`` = the chosen tenant, or true        ``$__conditionalAll(expr
                           for every tenant                             IN (${tenant}), $tenant)``
``$__db.``                 the sink's database                          nothing: the data source's
                                                                        default database
=========================  ===========================================  ==========================

Anything else that looks like a macro or a Grafana variable (``$name``) or a ClickHouse query
parameter (``{name:Type}``) is refused when the definitions are loaded: it would work in one
renderer and not the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Macro name → how many arguments it takes (0: none and no parentheses).
MACROS: dict[str, int] = {
    "timeFilter": 1,
    "dateFilter": 1,
    "timeInterval": 1,
    "tenantFilter": 1,
    "interval_s": 0,
    "fromTime": 0,
    "toTime": 0,
    "db": 0,
}
_MACRO = re.compile(r"\$__([A-Za-z_]+)")
_DOLLAR = re.compile(r"\$")
_QUERY_PARAMETER = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_]*\s*:[^}]*\}")

#: The query parameters the built-in rendering binds.
START = "{dashboard_from:DateTime64(3, 'UTC')}"
END = "{dashboard_to:DateTime64(3, 'UTC')}"
INTERVAL = "{dashboard_interval_s:UInt32}"
TENANT = "{dashboard_tenant:Nullable(String)}"
_NO_DATABASE = "\x00database\x00"


class MacroError(ValueError):
    """The SQL uses a macro wrongly; the message says which and where (line)."""


def _line_of(sql: str, index: int) -> int:
    return sql.count("\n", 0, index) + 1


def _arguments(sql: str, start: int, name: str) -> tuple[str, int]:
    """The text between the parenthesis at ``start`` and its match, and the index after it."""
    if start >= len(sql) or sql[start] != "(":
        raise MacroError(f"line {_line_of(sql, start)}: $__{name} needs one argument: $__{name}(…)")
    depth = 0
    quote: str | None = None
    index = start
    while index < len(sql):
        char = sql[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                argument = sql[start + 1 : index].strip()
                if not argument:
                    raise MacroError(f"line {_line_of(sql, start)}: $__{name}() needs an argument")
                return argument, index + 1
        index += 1
    raise MacroError(f"line {_line_of(sql, start)}: $__{name}( is never closed")


def expand(sql: str, render: Callable[[str, str | None], str]) -> str:
    """``sql`` with every macro replaced by ``render(name, argument)`` (arguments expanded
    first); raises :class:`MacroError` for an unknown macro or a malformed call."""
    out: list[str] = []
    position = 0
    for match in _DOLLAR.finditer(sql):
        if match.start() < position:
            continue
        macro = _MACRO.match(sql, match.start())
        if macro is None:
            raise MacroError(
                f"line {_line_of(sql, match.start())}: '$' starts no known macro; panels may use "
                + ", ".join(f"$__{name}" for name in MACROS)
            )
        name = macro.group(1)
        if name not in MACROS:
            raise MacroError(
                f"line {_line_of(sql, match.start())}: unknown macro $__{name}; known: "
                + ", ".join(f"$__{known}" for known in MACROS)
            )
        out.append(sql[position : match.start()])
        end = macro.end()
        argument: str | None = None
        if MACROS[name]:
            argument, end = _arguments(sql, end, name)
            argument = expand(argument, render)
        elif name == "db" and not sql.startswith(".", end):
            raise MacroError(
                f"line {_line_of(sql, match.start())}: $__db is followed by '.' and a table name"
            )
        out.append(render(name, argument))
        position = end
    out.append(sql[position:])
    return "".join(out)


def check(sql: str) -> None:
    """Raise :class:`MacroError` if ``sql`` is not portable between the two renderers."""
    found = _QUERY_PARAMETER.search(sql)
    if found is not None:
        raise MacroError(
            f"line {_line_of(sql, found.start())}: {found.group(0)} is a ClickHouse query "
            "parameter, which Grafana does not bind; use the $__ macros"
        )
    expand(sql, lambda name, argument: "")


def macros_used(sql: str) -> set[str]:
    """The names of the macros ``sql`` uses (``tenantFilter``: it follows the tenant)."""
    used: set[str] = set()

    def note(name: str, _argument: str | None) -> str:
        used.add(name)
        return ""

    expand(sql, note)
    return used


def grafana_sql(sql: str) -> str:
    """``sql`` for Grafana's ClickHouse data source (its own macros, the ``tenant`` variable)."""

    def render(name: str, argument: str | None) -> str:
        if name == "db":
            return _NO_DATABASE
        if name == "tenantFilter":
            return f"$__conditionalAll({argument} IN (${{tenant:singlequote}}), $tenant)"
        return f"$__{name}" if argument is None else f"$__{name}({argument})"

    # "$__db.table" becomes "table": the data source's default database.
    return expand(sql, render).replace(_NO_DATABASE + ".", "")


@dataclass(frozen=True, slots=True)
class BoundQuery:
    """A panel's SQL for the built-in page and the values ClickHouse binds into it."""

    sql: str
    parameters: dict[str, Any]


def bound_sql(
    sql: str,
    *,
    database: str,
    start: datetime,
    end: datetime,
    interval_seconds: int,
    tenant: str | None,
) -> BoundQuery:
    """``sql`` for the built-in page: every macro a bound query parameter (or the quoted
    database name, which comes from settings)."""

    def render(name: str, argument: str | None) -> str:
        if name == "timeFilter":
            return f"({argument} >= {START} AND {argument} < {END})"
        if name == "dateFilter":
            return f"({argument} >= toDate({START}) AND {argument} <= toDate({END}))"
        if name == "timeInterval":
            return f"toStartOfInterval(toDateTime({argument}, 'UTC'), INTERVAL {INTERVAL} SECOND)"
        if name == "interval_s":
            return INTERVAL
        if name == "fromTime":
            return f"toDateTime({START}, 'UTC')"
        if name == "toTime":
            return f"toDateTime({END}, 'UTC')"
        if name == "tenantFilter":
            return f"({TENANT} IS NULL OR {argument} = {TENANT})"
        return f"`{database}`"  # db; the name is checked by quote_identifier where it is set

    return BoundQuery(
        sql=expand(sql, render),
        parameters={
            "dashboard_from": start,
            "dashboard_to": end,
            "dashboard_interval_s": interval_seconds,
            "dashboard_tenant": tenant,
        },
    )
