"""Settings dataclasses filled from KVC_* environment variables: one parser for the service and the worker."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any


def env_values(cls: type, variables: Mapping[str, str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for dataclass `cls`: for each (field, variable) pair whose variable is set, its value parsed
    with the type of the field's default (int, float or str). Unset variables are left out, so the default holds."""
    env = os.environ if env is None else env
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return {name: type(defaults[name])(env[variable]) for name, variable in variables.items() if variable in env}
