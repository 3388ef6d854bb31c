"""The base every config section shares: unknown keys, NaN and true/false where a number belongs are
refused for every field alike; and the rule for names that become path components."""
from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# A name that becomes a path component (run dirs, adapter dirs, added-domain files): no separators,
# no "..", nothing a shell or a filesystem treats specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a run or a domain, or None when it can."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a safe name (fix: letters, digits and _ . = + -, starting with a letter "
                "or digit, no '..', at most 128 characters)")
    return None


def _takes_bool(annotation) -> bool:
    """True where a bool may appear in the value: a bool field, Any, or a section (it checks its own)."""
    if annotation is bool or annotation is Any or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


def _bool_inside(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, dict) and any(_bool_inside(x) for x in v.values())) or \
        (isinstance(v, list) and any(_bool_inside(x) for x in v))


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored; allow_inf_nan=False: an
    # infinite or NaN number anywhere is refused here, not found as NaN trials minutes later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _a_bool_is_not_a_number(cls, v, info):
        # pydantic would read `batch_size: true` as 1
        if _bool_inside(v) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("true/false where a number or name is expected (fix: give the value itself)")
        return v
