"""Logging set-up shared by the components: short past-tense lines with key=value fields, or
one JSON object per line for log collectors."""

from __future__ import annotations

import json
import logging
import sys
import time

from pcipt.settings import Setting


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


SETTINGS = (
    Setting(
        "--log-format",
        "text",
        "text: short key=value lines; json: one object per line",
        choices=("text", "json"),
    ),
    Setting(
        "--log-level",
        "INFO",
        "least severe level logged",
        str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
)
"""--log-format and --log-level, with their PCIPT_LOG_* environment twins."""


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
