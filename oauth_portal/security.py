"""Request input guard: the portal takes plain text values only.

Every form field, query parameter and JSON member the portal reads is a string (or a simple scalar).
Operator objects — ``{"$ne": null}`` in a JSON body, ``email[$ne]=`` in a form, keys starting with
``$``, nested objects or lists where a string is expected, and a form field sent more than once
(``email=a&email=b``, which would otherwise silently mean its first value) — are refused with 400
before any view runs, so nothing can reach a store query or be written. Views that must accept structured bodies (e.g. a
platform's signed webhook) opt out with ``@accepts_structured_body``.
"""
from __future__ import annotations

from typing import Any, Callable

from flask import Flask, abort, request

#: what a refused request is told
REFUSED = ("Only plain text values are accepted: objects, lists and field names that start with "
           "“$” or contain brackets are refused.")

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SCALARS = (str, int, float, bool, type(None))


def accepts_structured_body(view: Callable) -> Callable:
    """Mark a view whose request body may hold nested JSON (it must validate the body itself)."""
    view.accepts_structured_body = True  # type: ignore[attr-defined]
    return view


def bad_field_name(name: str) -> bool:
    """True for names used to smuggle operators or nesting: ``$ne``, ``email[$ne]``, ``a[b]``."""
    return name.startswith("$") or "[" in name or "]" in name or "\x00" in name


def repeated_field(form) -> str | None:
    """The first field name of a form body (a werkzeug ``MultiDict``) that carries more than one
    value, or None when every field is sent once."""
    for name, values in form.lists():
        if len(values) > 1:
            return name
    return None


def json_problem(data: Any) -> str | None:
    """Why a JSON body is refused (None when it is a flat object of scalar values with plain keys)."""
    if not isinstance(data, dict):
        return "The JSON body must be an object of plain values."
    for key, value in data.items():
        if bad_field_name(str(key)):
            return f"The field name “{str(key)[:40]}” is not accepted."
        if not isinstance(value, _SCALARS):
            return f"The field “{str(key)[:40]}” must be a plain value, not an object or a list."
    return None


def init_input_guard(app: Flask) -> None:
    """Register the guard as a ``before_request`` hook (after CSRF protection, so both apply)."""

    @app.before_request
    def refuse_operator_input():
        view = app.view_functions.get(request.endpoint or "")
        if view is not None and getattr(view, "accepts_structured_body", False):
            return None
        if any(bad_field_name(name) for name in request.args.keys()):
            abort(400, description=REFUSED)
        if request.method not in _STATE_CHANGING:
            return None
        if request.is_json:
            data = request.get_json(silent=True)
            if data is None:
                abort(400, description="The request body is not valid JSON.")
            problem = json_problem(data)
            if problem:
                abort(400, description=f"{problem} {REFUSED}")
        elif any(bad_field_name(name) for name in request.form.keys()):
            abort(400, description=REFUSED)
        else:
            repeated = repeated_field(request.form)
            if repeated is not None:
                abort(400, description=f"The field “{repeated[:40]}” was sent more than once; send each "
                                       f"field once. {REFUSED}")
        return None
