"""Secrets never reach a message, a log, a sidecar or a record.

:func:`redact` removes credentials from a text: ``scheme://user:pass@`` userinfo, query
values whose name says secret (``?token=...``), and every literal secret of this
environment (MLflow's password and token variables, the tracking URI's password, the
signing key given as text in ``ENGINEFORGE_SIGNING_KEY``). :func:`install_log_redaction`
applies it to every log record of the process, whatever library writes it.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

_SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "ENGINEFORGE_SIGNING_KEY")
_SECRET_NAME = r"(?:token|secret|passw|pwd|key|auth|sig|credential)"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_PARAM = re.compile(rf"(?i)([?&;][\w.-]*{_SECRET_NAME}[\w.-]*=)[^&#\s'\"]+")
_PEM_ARMOR = re.compile(r"-----(BEGIN|END) [A-Z ]+-----")


def _secret_values() -> set[str]:
    """Literal secrets of this environment: the tracking URI's password and query values,
    the secret variables (raw and URL-encoded; a multi-line value such as a PEM key also
    line by line, its armor lines excepted)."""
    found = {os.environ.get(v, "") for v in _SECRET_VARS}
    found |= {ln.strip() for v in list(found) if "\n" in v for ln in v.splitlines()
              if not _PEM_ARMOR.fullmatch(ln.strip())}
    parts = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if "@" in parts.netloc:
        found.add(parts.netloc.rsplit("@", 1)[0].partition(":")[2])
    found |= {v for k, v in parse_qsl(parts.query) if re.search(_SECRET_NAME, k, re.I)}
    found |= {f(v) for v in list(found) for f in (unquote, quote)}
    return {v for v in found if len(v) >= 4}


def redact(text: str) -> str:
    """``text`` without credentials: ``scheme://user:pass@`` -> ``scheme://***@``,
    ``?token=...`` -> ``?token=***``, and every secret value of this environment -> ``***``."""
    text = _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))
    for value in sorted(_secret_values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def install_log_redaction() -> None:
    """Redact every log record this process creates from now on (MLflow's, urllib3's and
    ours, whatever handler writes them: terminal, job log). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "engineforge_redacts", False):
        return

    def redacting(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record stays as it is
            return record
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    redacting.engineforge_redacts = True
    logging.setLogRecordFactory(redacting)
