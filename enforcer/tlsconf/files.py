"""Reading a certificate, key or CRL file, with one clear reason when it cannot be used."""

from __future__ import annotations

from pathlib import Path


class FileProblem(Exception):
    """Why a file could not be used ("no such file", "file is empty", ...)."""


def read_nonempty(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileProblem("no such file") from None
    except IsADirectoryError:
        raise FileProblem("is a directory, expected a file") from None
    except OSError as exc:
        raise FileProblem(f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise FileProblem("file is empty")
    return data
