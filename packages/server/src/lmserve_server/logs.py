"""Logging setup: readable text lines or one JSON object per line (``--log_format``).

Request lines come from the ``lmserve.access`` logger with their fields passed as ``extra``
(``request_id``, ``method``, ``route``, ``model``, ``status``, ``latency_ms``, token counts):
the text format appends them as ``key=value``, the JSON format makes them keys.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
ACCESS_LOGGER = "lmserve.access"
# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# Decorations other libraries put on every record: uvicorn's coloured copy of the message,
# vLLM's process name; Ray's record factory adds ``_ray_timestamp_ns`` (private: any ``_``).
_DECORATIONS = {"color_message", "vllm_process_name"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and k not in _DECORATIONS and not k.startswith("_")}  # fmt: skip


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # key=value tails on lmserve's own lines only: elsewhere they are other libraries'.
        fields = record_fields(record) if record.name.startswith("lmserve") else {}
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(record_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Python warnings through the same handler (in JSON mode: JSON lines too).
    logging.captureWarnings(True)
    # httpx, urllib3 and filelock are chatty at INFO about things users cannot act on.
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
