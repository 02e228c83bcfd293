"""The snapshotter's metadata in sqlite (ROOT/metadata.db): one row per snapshot.

A snapshot keeps its id (and so its directory ROOT/snapshots/ID) from Prepare through Commit;
the name changes from the active key to the committed name, as in containerd's metastore.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SnapshotExists, SnapshotInvalid, SnapshotNotFound, SnapshotPrecondition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


class Kind(enum.IntEnum):
    """containerd.services.snapshots.v1.Kind."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One row: `parent` is the parent's name ("" for none); `remote` is the JSON record of a
    lazily mounted layer (None for a snapshot on local disk)."""

    id: int
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0
    remote: str | None = None


class SnapshotStore:
    """sqlite-backed snapshot metadata. Thread-safe: one connection behind a lock; every
    method is one transaction."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    _SELECT = ("SELECT s.id, s.name, COALESCE(p.name, ''), s.kind, s.created_ns, s.updated_ns, "
               "s.labels, s.size, s.inodes, s.remote FROM snapshots s "
               "LEFT JOIN snapshots p ON p.id = s.parent_id")

    @staticmethod
    def _row(row: tuple[int, str, str, int, int, int, str, int, int, str | None]) -> Snapshot:
        return Snapshot(id=row[0], name=row[1], parent=row[2], kind=Kind(row[3]),
                        created_ns=row[4], updated_ns=row[5], labels=json.loads(row[6]),
                        size=row[7], inodes=row[8], remote=row[9])

    def _get(self, conn: sqlite3.Connection, name: str) -> Snapshot | None:
        row = conn.execute(self._SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else self._row(row)

    def get(self, name: str) -> Snapshot:
        with self._lock:
            snap = self._get(self._conn, name)
        if snap is None:
            raise SnapshotNotFound(f"snapshot {name!r}: not found")
        return snap

    def find(self, name: str) -> Snapshot | None:
        with self._lock:
            return self._get(self._conn, name)

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [self._row(row) for row in self._conn.execute(self._SELECT + " ORDER BY s.id")]

    def ancestors(self, snap: Snapshot) -> list[Snapshot]:
        """The parent, its parent, ... (nearest first)."""
        with self._lock:
            found: list[Snapshot] = []
            current = snap
            while current.parent:
                parent = self._get(self._conn, current.parent)
                assert parent is not None, "a parent cannot be removed before its children"
                found.append(parent)
                current = parent
            return found

    def _parent_id(self, conn: sqlite3.Connection, parent: str) -> int | None:
        """The id of `parent` ("": none), which must exist and be committed."""
        if not parent:
            return None
        parent_snap = self._get(conn, parent)
        if parent_snap is None:
            raise SnapshotNotFound(f"parent snapshot {parent!r}: not found")
        if parent_snap.kind != Kind.COMMITTED:
            raise SnapshotInvalid(f"parent snapshot {parent!r}: not committed")
        return parent_snap.id

    def create(self, name: str, parent: str, kind: Kind, labels: Mapping[str, str], *,
               remote: str | None = None) -> Snapshot:
        """A new snapshot; the parent must exist and be committed (as containerd's metastore)."""
        now = time.time_ns()
        with self.transaction() as conn:
            if self._get(conn, name) is not None:
                raise SnapshotExists(f"snapshot {name!r}: already exists")
            parent_id = self._parent_id(conn, parent)
            cur = conn.execute(
                "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels, "
                "remote) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, parent_id, int(kind), now, now, json.dumps(dict(labels), sort_keys=True),
                 remote))
            snap = self._get(conn, name)
        assert snap is not None and snap.id == cur.lastrowid
        return snap

    def commit(self, key: str, name: str, labels: Mapping[str, str], *, size: int,
               inodes: int) -> Snapshot:
        """Active `key` becomes committed `name` (same id, same directory)."""
        now = time.time_ns()
        with self.transaction() as conn:
            active = self._get(conn, key)
            if active is None:
                raise SnapshotNotFound(f"snapshot {key!r}: not found")
            if active.kind != Kind.ACTIVE:
                raise SnapshotPrecondition(f"snapshot {key!r}: not active "
                                           f"({active.kind.label})")
            if self._get(conn, name) is not None:
                raise SnapshotExists(f"snapshot {name!r}: already exists")
            conn.execute(
                "UPDATE snapshots SET name = ?, kind = ?, updated_ns = ?, created_ns = ?, "
                "labels = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, json.dumps(dict(labels), sort_keys=True),
                 size, inodes, active.id))
            snap = self._get(conn, name)
        assert snap is not None
        return snap

    def adopt(self, old: str, name: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        """Committed `old` (a layer mounted ahead, without a parent) becomes committed `name`
        with `parent` and `labels` (same id, same directory)."""
        now = time.time_ns()
        with self.transaction() as conn:
            snap = self._get(conn, old)
            if snap is None:
                raise SnapshotNotFound(f"snapshot {old!r}: not found")
            if self._get(conn, name) is not None:
                raise SnapshotExists(f"snapshot {name!r}: already exists")
            parent_id = self._parent_id(conn, parent)
            conn.execute(
                "UPDATE snapshots SET name = ?, parent_id = ?, updated_ns = ?, created_ns = ?, "
                "labels = ? WHERE id = ?",
                (name, parent_id, now, now, json.dumps(dict(labels), sort_keys=True), snap.id))
            adopted = self._get(conn, name)
        assert adopted is not None
        return adopted

    def remove(self, name: str) -> Snapshot:
        """Delete the row; refused while children exist."""
        with self.transaction() as conn:
            snap = self._get(conn, name)
            if snap is None:
                raise SnapshotNotFound(f"snapshot {name!r}: not found")
            (children,) = conn.execute("SELECT COUNT(*) FROM snapshots WHERE parent_id = ?",
                                       (snap.id,)).fetchone()
            if children:
                raise SnapshotPrecondition(f"snapshot {name!r}: has {children} "
                                           f"child snapshot{'s' if children != 1 else ''}")
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def set_labels(self, name: str, labels: Mapping[str, str]) -> Snapshot:
        with self.transaction() as conn:
            snap = self._get(conn, name)
            if snap is None:
                raise SnapshotNotFound(f"snapshot {name!r}: not found")
            conn.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                         (json.dumps(dict(labels), sort_keys=True), time.time_ns(), snap.id))
            snap = self._get(conn, name)
        assert snap is not None
        return snap

    def set_remote(self, name: str, remote: str | None) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE snapshots SET remote = ? WHERE name = ?", (remote, name))

    def ids(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT id FROM snapshots")}
