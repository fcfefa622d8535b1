"""On-disk harness history: every version once, its parent and the patch that made it.

Layout: ``<root>/versions/<version>.json`` holding {harness, parent, patch,
reason}, and ``<root>/HEAD`` naming the current version. Writes go through a
temp file and ``os.replace`` so a crash never leaves half a record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from siajax.harness.jsonpatch import make_patch
from siajax.harness.schema import Harness, HarnessError, from_dict, patch_harness, to_dict


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` via a fsynced temp file and an atomic rename; an OSError names
    ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only disk: the old file stands, the partial one goes
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err


class HarnessStore:
    """Append-only versions plus a movable HEAD (rollback moves HEAD, never deletes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)

    def _record_path(self, version: str) -> Path:
        return self.root / "versions" / f"{version}.json"

    def _record(self, version: str) -> dict:
        path = self._record_path(version)
        if not path.exists():
            raise KeyError(f"harness version {version!r} is not in {self.root}")
        return json.loads(path.read_text(encoding="utf-8"))

    def put(self, harness: Harness, *, parent: str | None = None, patch: list | None = None,
            reason: str = "") -> str:
        """Stores a version (idempotent) and moves HEAD to it."""
        version = harness.version
        if not self._record_path(version).exists():
            record = {"harness": to_dict(harness), "parent": parent, "patch": patch, "reason": reason}
            atomic_write_text(self._record_path(version), json.dumps(record, ensure_ascii=False, indent=1))
        atomic_write_text(self.root / "HEAD", version)
        return version

    def get(self, version: str | None = None) -> Harness:
        return from_dict(self._record(version or self.head)["harness"])

    @property
    def head(self) -> str:
        head = self.root / "HEAD"
        if not head.exists():
            raise KeyError(f"{self.root} holds no harness yet")
        return head.read_text(encoding="utf-8").strip()

    def apply(self, patch: list[dict], *, reason: str = "") -> str:
        """Patches HEAD; an invalid patch raises HarnessError and changes nothing."""
        current = self.head
        return self.put(patch_harness(self.get(current), patch), parent=current, patch=patch, reason=reason)

    def history(self, version: str | None = None) -> list[dict]:
        """Records from the root to ``version`` (HEAD by default), each with its version id."""
        chain, cursor = [], version or self.head
        while cursor is not None:
            record = self._record(cursor)
            chain.append({"version": cursor, **record})
            cursor = record["parent"]
            if len(chain) > 10_000:
                raise HarnessError("harness history has a cycle")
        return chain[::-1]

    def diff(self, a: str, b: str) -> list[dict]:
        """A JSON Patch taking version ``a`` to version ``b``."""
        return make_patch(self._record(a)["harness"], self._record(b)["harness"])

    def rollback(self, version: str) -> Harness:
        """Moves HEAD back to a stored version."""
        harness = self.get(version)
        atomic_write_text(self.root / "HEAD", version)
        return harness
