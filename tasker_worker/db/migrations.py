"""Schema migrations: pgmq first, then the project's ``sql/migrations/*.sql`` in order.

``migrate`` is idempotent and safe to run from many processes at once: it holds a session-level
advisory lock for its whole run, and each migration is applied and recorded in
``tasker.schema_migrations`` in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tasker_worker.config.models import RetentionConfig
from tasker_worker.db import queries
from tasker_worker.db.connection import connect
from tasker_worker.errors import MigrationError, first_line

log = logging.getLogger(__name__)

#: The migration that partitions tasker.step_results by day (0021).
FIRST_PARTITIONED_VERSION = "0021"
#: Days after today whose outcome partitions a migration creates ([retention] partitions_ahead's
#: default; the supervisor keeps the configured number from then on).
FIRST_PARTITION_DAYS = RetentionConfig.model_fields["partitions_ahead"].default
#: The longest wait for the outcome table's lock when a migration creates its partitions (a
#: migration may wait; the supervisor's own wait, fleet/retention.py, is 0.5 s).
FIRST_PARTITIONS_LOCK_TIMEOUT_MS = 10_000

#: Arbitrary constant shared by every tasker-worker migrator ("tasker" in ASCII; 127961897067890,
#: which tasker.create_namespace_queue and tasker.ensure_notify_triggers take too, 0013).
MIGRATION_LOCK_KEY = 0x7461736B6572


@dataclass(frozen=True)
class Migration:
    """One SQL file of ``sql/migrations``."""

    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        """The file's text."""
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        """sha256 of the file, recorded to notice edited migrations."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    """What ``db status`` reports."""

    pgmq_installed_by: str | None
    pgmq_version: str | None
    applied: list[tuple[str, str, str]]  # (version, name, applied_at)
    pending: list[str]
    changed: list[str]
    server_version: str
    notify_triggers: int
    queues: int


def sql_dir() -> Path:
    """The ``sql`` folder: packaged in the wheel, or the repository's when run from source."""
    packaged = Path(__file__).resolve().parent.parent / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "sql"


def discover() -> list[Migration]:
    """All migrations, in version order."""
    folder = sql_dir() / "migrations"
    if not folder.is_dir():
        raise MigrationError(f"migration folder not found: {folder}")
    found = []
    for path in sorted(folder.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append(Migration(version=version, name=name or path.stem, path=path))
    return found


async def migrate(url: str, until: str | None = None) -> list[str]:
    """Apply pgmq and pending migrations; return what was applied (empty when up to date).

    Everything pending applies in one transaction under a transaction-level advisory lock: of
    several processes starting at once, one applies it all and the others find it done, a
    migration that fails leaves the database as it was, and nothing here needs a session (so
    it also works through a transaction pooler; no statement is prepared either). A pending
    migration with an online preparation (``ONLINE_PREPARATIONS``) has it run first, each
    statement its own short transaction, so that the migration itself holds its locks briefly.
    ``until``: apply the migrations up to this version only (tests of an upgrade path).
    """
    conn = await connect(url, prepared=False)
    applied: list[str] = []
    try:
        if until is None and await _up_to_date(conn):
            # Nothing to apply: no DDL and no lock, so that a worker or producer role, which
            # owns nothing, can start with auto_migrate on (only `db migrate` needs ownership).
            may = await (await conn.execute(queries.MAY_ENSURE_NOTIFY_TRIGGERS)).fetchone()
            if may and may[0]:
                await conn.execute(queries.ENSURE_NOTIFY_TRIGGERS)
            return applied
        await _prepare_online(conn, until)
        async with conn.transaction():
            await conn.execute(queries.MIGRATION_LOCK, (MIGRATION_LOCK_KEY,))
            await conn.execute(queries.CREATE_MIGRATIONS_TABLE)
            pgmq = await _ensure_pgmq(conn)
            if pgmq:
                applied.append(pgmq)
            done = {row[0] for row in await (await conn.execute(queries.APPLIED_VERSIONS)).fetchall()}
            have = set(done)
            for migration in discover():
                if migration.version in done or (until is not None and migration.version > until):
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(migration.sql.encode())
                        await conn.execute(
                            queries.RECORD_MIGRATION, (migration.version, migration.name, migration.checksum)
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {migration.path.name} failed: {first_line(exc)}") from exc
                applied.append(f"{migration.version}_{migration.name}")
                have.add(migration.version)
                log.info("applied migration %s", migration.path.name)
            # A new (or upgraded) database gets its first day partitions now: without them its
            # first outcomes go to the default partition, and the first worker's supervisor
            # moves them out under the outcome table's exclusive lock while its steps settle.
            if applied and FIRST_PARTITIONED_VERSION in have:
                await conn.execute(
                    queries.CREATE_FIRST_HISTORY_PARTITIONS, (FIRST_PARTITIONS_LOCK_TIMEOUT_MS, FIRST_PARTITION_DAYS)
                )
        # Queues created while no event trigger could exist (or by a non-superuser).
        await conn.execute(queries.ENSURE_NOTIFY_TRIGGERS)
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed: {first_line(exc)}") from exc
    finally:
        await conn.close()
    return applied


#: Work a migration needs done before its transaction, outside it: (version, the query saying
#: whether it is needed, the statements, each run in a transaction of its own and idempotent).
#: 0021 partitions tasker.step_results: a column with a constant default (a catalog change) and
#: a CHECK validated while the step path goes on writing, so that the migration attaches the
#: table as a partition without scanning it under its exclusive lock.
ONLINE_PREPARATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("0021", queries.HISTORY_PREPARE_NEEDED, queries.HISTORY_PREPARE),
)


async def _prepare_online(conn: psycopg.AsyncConnection[Any], until: str | None) -> None:
    """Run the online preparations of the pending migrations that need them (``migrate``)."""
    exists = await (await conn.execute(queries.MIGRATIONS_TABLE_EXISTS)).fetchone()
    if not (exists and exists[0]):
        return  # a fresh database: nothing populated to prepare
    done = {row[0] for row in await (await conn.execute(queries.APPLIED_VERSIONS)).fetchall()}
    for version, needed, statements in ONLINE_PREPARATIONS:
        if version in done or (until is not None and version > until):
            continue
        row = await (await conn.execute(needed)).fetchone()
        if not (row and row[0]):
            continue
        log.info("preparing migration %s online", version)
        try:
            for statement in statements:
                await conn.execute(statement)
        except psycopg.Error as exc:
            raise MigrationError(f"preparing migration {version} failed: {first_line(exc)}") from exc


async def _up_to_date(conn: psycopg.AsyncConnection[Any]) -> bool:
    """pgmq installed and every migration recorded (read-only; False when unsure)."""
    row = await (await conn.execute(queries.PGMQ_PRESENT)).fetchone()
    if row is None or not (row[0] or row[1]):
        return False
    exists = await (await conn.execute(queries.MIGRATIONS_TABLE_EXISTS)).fetchone()
    if not (exists and exists[0]):
        return False
    try:
        done = {r[0] for r in await (await conn.execute(queries.APPLIED_VERSIONS)).fetchall()}
    except psycopg.errors.InsufficientPrivilege:
        return False
    return all(m.version in done for m in discover())


async def _ensure_pgmq(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """Install pgmq exactly once: the server's extension if offered, else the bundled SQL."""
    row = await (await conn.execute(queries.PGMQ_PRESENT)).fetchone()
    assert row is not None
    has_extension, has_schema, extension_available = row
    if has_extension or has_schema:
        return None
    if extension_available:
        async with conn.transaction():
            await conn.execute(queries.INSTALL_PGMQ_EXTENSION)
            version = await _extension_version(conn)
            await conn.execute(queries.RECORD_MIGRATION, ("pgmq", f"extension {version}", "extension"))
        return f"pgmq extension {version}"
    from pgmq.install import get_embedded_install_sql, get_embedded_sql_version

    version = get_embedded_sql_version()
    try:
        async with conn.transaction():
            await conn.execute(get_embedded_install_sql().encode())
            await conn.execute(queries.RECORD_MIGRATION, ("pgmq", f"bundled sql {version}", "pgmq-sql-" + version))
    except psycopg.Error as exc:
        raise MigrationError(f"installing pgmq {version} from bundled SQL failed: {first_line(exc)}") from exc
    return f"pgmq bundled sql {version}"


async def _extension_version(conn: psycopg.AsyncConnection[Any]) -> str:
    row = await (await conn.execute(queries.PGMQ_EXTENSION_VERSION)).fetchone()
    return str(row[0]) if row else "?"


async def status(url: str) -> MigrationStatus:
    """What is installed, what is pending, and what changed since it was applied."""
    async with await connect(url) as conn:
        server_version = str((await (await conn.execute(queries.SERVER_VERSION)).fetchone() or ["?"])[0])
        exists = await (await conn.execute(queries.MIGRATIONS_TABLE_EXISTS)).fetchone()
        rows: list[tuple[Any, ...]] = []
        if exists and exists[0]:
            rows = await (await conn.execute(queries.MIGRATION_ROWS)).fetchall()
        pgmq_by: str | None = None
        pgmq_version: str | None = None
        ext = await (await conn.execute(queries.PGMQ_EXTENSION_VERSION)).fetchone()
        if ext:
            pgmq_by, pgmq_version = "extension", str(ext[0])
        else:
            for version, _name, checksum, _ in rows:
                if version == "pgmq":
                    pgmq_by, pgmq_version = "bundled sql", str(checksum).removeprefix("pgmq-sql-")
        counts = (0, 0)
        if await _has_tasker_schema(conn):
            got = await (await conn.execute(queries.NOTIFY_TRIGGER_COUNTS)).fetchone()
            if got:
                counts = (int(got[0]), int(got[1]))
    recorded = {str(r[0]): str(r[2]) for r in rows}
    migrations = discover()
    return MigrationStatus(
        pgmq_installed_by=pgmq_by,
        pgmq_version=pgmq_version,
        applied=[(str(r[0]), str(r[1]), str(r[3])) for r in rows if r[0] != "pgmq"],
        pending=[m.path.name for m in migrations if m.version not in recorded],
        changed=[m.path.name for m in migrations if m.version in recorded and recorded[m.version] != m.checksum],
        server_version=server_version,
        notify_triggers=counts[0],
        queues=counts[1],
    )


async def _has_tasker_schema(conn: psycopg.AsyncConnection[Any]) -> bool:
    row = await (await conn.execute(queries.NOTIFY_HELPER_EXISTS)).fetchone()
    return bool(row and row[0])
