"""The run store: one SQLite file per output directory, one row per candidate.

Every finished candidate is committed at once, so a crash or Ctrl-C keeps it; a second run
with the same --out reuses rows instead of measuring again. The store refuses to mix runs of a
different model, target, data or metric (the `identity` check).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import UsageError
from ..genotype import Genotype

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    genotype TEXT NOT NULL UNIQUE,
    graph_hash TEXT,
    status TEXT NOT NULL,           -- ok | infeasible | failed
    fidelity REAL,
    fidelity_detail TEXT,
    latency_ms REAL,                -- median
    measurement TEXT,               -- JSON: Measurement.to_dict()
    error TEXT,
    applied TEXT,                   -- JSON: moves applied / skipped
    timings TEXT,                   -- JSON: seconds per stage
    size_bytes INTEGER,
    duplicate_of INTEGER,
    created REAL NOT NULL
);
"""

STATUSES = ("ok", "infeasible", "failed")


@dataclass
class Record:
    genotype: Genotype
    status: str
    graph_hash: str | None = None
    fidelity: float | None = None
    fidelity_detail: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    measurement: dict[str, Any] | None = None
    error: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    size_bytes: int | None = None
    duplicate_of: int | None = None
    id: int | None = None
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "genotype": dict(self.genotype), "status": self.status,
            "graph_hash": self.graph_hash, "fidelity": self.fidelity, "fidelity_detail": self.fidelity_detail,
            "latency_ms": self.latency_ms, "measurement": self.measurement, "error": self.error,
            "applied": self.applied, "timings": self.timings, "size_bytes": self.size_bytes,
            "duplicate_of": self.duplicate_of, "created": self.created,
        }


class RunStore:
    FILENAME = "runs.sqlite"

    def __init__(self, path: str | Path, readonly: bool = False):
        from .rundir import check_run_store_tables, check_store_file, connect_read_only, store_error

        self.path = Path(path)
        try:
            if readonly:  # `graphopt runs/export/report`: never create tables or switch a file to WAL
                self.db = connect_read_only(self.path)
                check_run_store_tables(self.db, self.path)
                return
            check_store_file(self.path)  # a truncated or foreign database is refused, not written into
            self.db = sqlite3.connect(str(self.path), isolation_level=None)  # autocommit
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise store_error(self.path, e) from None

    @classmethod
    def in_dir(cls, out_dir: str | Path) -> "RunStore":
        return cls(Path(out_dir) / cls.FILENAME)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ identity of the run
    def identity(self) -> dict[str, str]:
        """What the run is keyed on, as stored by check_identity: {"id.model": sha256, ...}."""
        return dict(self.db.execute("SELECT key, value FROM meta WHERE key LIKE 'id.%'").fetchall())

    def check_identity(self, identity: dict[str, str]) -> bool:
        """Record identity on first use; on reuse, refuse a different one. True if resuming."""
        rows = self.identity()
        if not rows:
            for k, v in identity.items():
                self.db.execute("INSERT INTO meta VALUES (?, ?)", (f"id.{k}", str(v)))
            return False
        for k, v in identity.items():
            old = rows.get(f"id.{k}")
            if old != str(v):
                raise UsageError(f"{self.path.parent} holds a run with a different {k} ({_short(old)} vs "
                                 f"{_short(v)}); use another --out, or delete it to start over")
        return True

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------------------ records
    def commit(self, rec: Record) -> Record:
        if rec.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        cur = self.db.execute(
            "INSERT INTO candidates (genotype, graph_hash, status, fidelity, fidelity_detail, latency_ms, "
            "measurement, error, applied, timings, size_bytes, duplicate_of, created) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (rec.genotype.to_json(), rec.graph_hash, rec.status, rec.fidelity, json.dumps(rec.fidelity_detail),
             rec.latency_ms, json.dumps(rec.measurement) if rec.measurement is not None else None, rec.error,
             json.dumps(rec.applied), json.dumps(rec.timings), rec.size_bytes, rec.duplicate_of, rec.created))
        rec.id = cur.lastrowid
        return rec

    def get(self, genotype: Genotype) -> Record | None:
        row = self.db.execute("SELECT * FROM candidates WHERE genotype = ?", (genotype.to_json(),)).fetchone()
        return self._record(row) if row else None

    def by_graph_hash(self, graph_hash: str) -> Record | None:
        row = self.db.execute("SELECT * FROM candidates WHERE graph_hash = ? AND duplicate_of IS NULL "
                              "ORDER BY id LIMIT 1", (graph_hash,)).fetchone()
        return self._record(row) if row else None

    def by_id(self, cid: int) -> Record | None:
        row = self.db.execute("SELECT * FROM candidates WHERE id = ?", (cid,)).fetchone()
        return self._record(row) if row else None

    def records(self) -> list[Record]:
        return [self._record(r) for r in self.db.execute("SELECT * FROM candidates ORDER BY id")]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]

    def _record(self, row: tuple) -> Record:
        cols = [d[0] for d in self.db.execute("SELECT * FROM candidates LIMIT 0").description]
        d = dict(zip(cols, row))
        return Record(
            id=d["id"], genotype=Genotype.from_json(d["genotype"]), graph_hash=d["graph_hash"], status=d["status"],
            fidelity=d["fidelity"], fidelity_detail=json.loads(d["fidelity_detail"] or "{}"),
            latency_ms=d["latency_ms"], measurement=json.loads(d["measurement"]) if d["measurement"] else None,
            error=d["error"], applied=json.loads(d["applied"] or "{}"), timings=json.loads(d["timings"] or "{}"),
            size_bytes=d["size_bytes"], duplicate_of=d["duplicate_of"], created=d["created"])


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 16 else s[:12] + "..."
