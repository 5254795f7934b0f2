"""Resume journal: which row bands of write cells are finished in the partial output file.

The journal lives next to the output (``.<name>.journal.json``): a JSON header line with a key
(SHA-256 of the canonical JSON of the inputs' identities and all parameters) and the parameters
themselves, then one line per finished band ``{"band": i}``, appended and fsync'ed only after
the band's pixels were flushed to the partial file. A journal whose key differs from this run's is
refused with a message naming the parameters that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class JournalMismatch(ValueError):
    """The journal next to the output was made with other inputs or parameters."""


class PartialRunDiscarded(UserWarning):
    """A run without ``resume`` found an interrupted run of the same output and starts over."""


def make_key(params: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``params`` as canonical JSON."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def journal_path(out_path: str) -> str:
    p = Path(out_path)
    return str(p.with_name(f".{p.name}.journal.json"))


class Journal:
    """Append-only record of finished bands for one output file and one set of parameters."""

    def __init__(self, out_path: str, params: dict[str, Any]) -> None:
        self.path = journal_path(out_path)
        self.params = json.loads(json.dumps(params, sort_keys=True, default=str))
        self.key = make_key(params)
        self.done: set[int] = set()

    def load(self) -> set[int]:
        """Read an existing journal; return its finished bands. Refuses a mismatching key."""
        if not os.path.exists(self.path):
            return set()
        try:
            header, bands = _read(self.path)
        except (IndexError, ValueError, KeyError) as err:
            raise JournalMismatch(f"the resume journal {self.path} is unreadable ({err}); "
                                  "delete it or run without --resume") from err
        if header.get("key") != self.key:
            diff = _differences(header.get("params", {}), self.params)
            raise JournalMismatch(
                f"the resume journal {self.path} was made with other inputs or parameters "
                f"(different: {', '.join(diff) or 'unknown'}); rerun without --resume to start "
                "over (this discards the partial result), or use the original inputs/parameters")
        self.done = set(bands)  # a copy: the caller's set of resumed bands must not grow
        return bands

    def peek(self) -> tuple[int, bool] | None:
        """``(finished bands, same key as this run)`` of the journal on disk, or None when there
        is none or it is unreadable; never raises (:meth:`load` is for resuming)."""
        try:
            header, bands = _read(self.path)
        except (OSError, IndexError, ValueError, KeyError):
            return None
        return len(bands), header.get("key") == self.key

    def start(self) -> None:
        """Create a fresh journal (drops any previous one)."""
        with open(self.path, "w") as f:
            f.write(json.dumps({"key": self.key, "params": self.params}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done = set()

    def mark(self, band: int) -> None:
        """Record band ``band`` as finished (durably)."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"band": band}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(band)

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _read(path: str) -> tuple[dict[str, Any], set[int]]:
    """The header and the finished bands of the journal at ``path`` (a torn last line, left by
    a crash, ends the bands); raises on a missing or unreadable header."""
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    header = json.loads(lines[0])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    bands = set()
    for ln in lines[1:]:
        try:
            bands.add(int(json.loads(ln)["band"]))
        except (ValueError, KeyError, TypeError):
            break
    return header, bands


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ (``params.method``), down into nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{k}.") or [f"{prefix}{k}"])
        else:
            out.append(f"{prefix}{k}")
    return out
