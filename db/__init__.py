"""The decision log database: open it, check its schema, migrate it.

``open_db(url)`` is the one entry point. ``url`` is any SQLAlchemy URL
(``postgresql+psycopg://...``) or a plain file path (taken as SQLite); ``None`` means the
default, ``/var/lib/vstack/decisions.sqlite``. SQLite databases are put in WAL mode, so
``vstack replay``/``vstack learn`` can read while the daemon writes.

The schema is owned by the Alembic migrations in ``db/migrations``. ``open_db`` upgrades an
older database to the newest revision unless ``migrate=False`` (``--no-migrate``), in which
case it raises ``SchemaOutdated`` with the message to run ``vstack db upgrade``.

Every failure to reach or use the database at open time is a ``DatabaseError`` with a
message meant for the user (never a traceback): ``DatabaseUnavailable``,
``SchemaOutdated``, ``SchemaTooNew``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

DEFAULT_PATH = "/var/lib/vstack/decisions.sqlite"
DEFAULT_URL = f"sqlite:///{DEFAULT_PATH}"
_HERE = Path(__file__).resolve().parent
OUTDATED_MESSAGE = "database schema is older than this vstack: run `vstack db upgrade`"


class DatabaseError(Exception):
    """A decision-log database problem with a user-facing message."""


class DatabaseUnavailable(DatabaseError):
    """The database URL cannot be opened or reached."""


class SchemaOutdated(DatabaseError):
    """The database's schema is older than this vstack and migrating was not allowed."""


class SchemaTooNew(DatabaseError):
    """The database was migrated by a newer vstack than this one."""


def to_url(url: str | os.PathLike[str] | None) -> str:
    """A SQLAlchemy URL for ``url``: ``None`` -> the default, a path -> SQLite on that path."""
    if url is None:
        return DEFAULT_URL
    text = os.fspath(url)
    if "://" in text or text.startswith("sqlite:"):
        return text
    return f"sqlite:///{Path(text).expanduser().absolute()}"


def safe_url(url: str) -> str:
    """``url`` with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config(str(_HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    return cfg


def head_revision() -> str:
    """The newest schema revision this vstack knows."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    return str(heads[0])


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None``: no vstack schema yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    return str(heads[0]) if heads else None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def make_engine(url: str | os.PathLike[str] | None = None, *, create: bool = True) -> Engine:
    """An engine for ``url`` (no schema check). Raises ``DatabaseUnavailable``."""
    text = to_url(url)
    try:
        parsed = make_url(text)
    except ArgumentError as e:
        raise DatabaseUnavailable(f"not a database URL: {text!r} ({e})") from None
    kwargs: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    memory = is_sqlite and parsed.database in (None, "", ":memory:")
    if is_sqlite and not memory:
        path = Path(str(parsed.database))
        if not path.exists():
            if not create:
                raise DatabaseUnavailable(f"database {path} does not exist")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseUnavailable(
                    f"cannot create the database directory {path.parent}: {e.strerror or e}"
                ) from None
        if "timeout" not in parsed.query:  # how long to wait for a lock (``?timeout=0.1``)
            kwargs["connect_args"] = {"timeout": 5.0}
    if memory:
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError, ArgumentError) as e:
        raise DatabaseUnavailable(f"cannot open {safe_url(text)}: {e}") from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.connect():
            pass
    except (SQLAlchemyError, OSError) as e:
        engine.dispose()
        raise DatabaseUnavailable(f"cannot reach database {safe_url(text)}: "
                                  f"{getattr(e, 'orig', None) or e}") from None
    return engine


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Run the migrations up to ``revision``; returns (before, after)."""
    from alembic import command

    before = schema_revision(engine)
    cfg = _alembic_config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as e:
        raise DatabaseUnavailable(f"migrating {safe_url(str(engine.url))} failed: "
                                  f"{getattr(e, 'orig', None) or e}") from None
    return before, schema_revision(engine)


def check_schema(engine: Engine, *, migrate: bool = True) -> str:
    """Make sure the schema is at the head revision (migrating if allowed); returns it."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(_alembic_config())
    head = str(script.get_heads()[0])
    try:
        current = schema_revision(engine)
    except SQLAlchemyError as e:
        raise DatabaseUnavailable(f"cannot read the schema of {safe_url(str(engine.url))}: "
                                  f"{getattr(e, 'orig', None) or e}") from None
    if current == head:
        return head
    if current is not None:
        try:
            known = script.get_revision(current) is not None
        except CommandError:
            known = False
        if not known:
            raise SchemaTooNew(f"database schema revision {current!r} is newer than this "
                               f"vstack (which knows up to {head!r}): upgrade vstack")
    if not migrate:
        raise SchemaOutdated(OUTDATED_MESSAGE)
    try:
        upgrade(engine)
    except DatabaseUnavailable:
        # another process (a second vstack) may have migrated it at the same time
        if schema_revision(engine) != head:
            raise
    return head


def open_db(url: str | os.PathLike[str] | None = None, *, create: bool = True,
            migrate: bool = True) -> Engine:
    """Open the decision log at ``url`` and bring its schema to the head revision.

    ``create``: create a missing SQLite file (and its directory). ``migrate=False``: raise
    ``SchemaOutdated`` rather than upgrade. Raises ``DatabaseError`` subclasses only.
    """
    engine = make_engine(url, create=create)
    try:
        check_schema(engine, migrate=migrate)
    except BaseException:
        engine.dispose()
        raise
    return engine


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())


__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_URL",
    "OUTDATED_MESSAGE",
    "DatabaseError",
    "DatabaseUnavailable",
    "SchemaOutdated",
    "SchemaTooNew",
    "check_schema",
    "head_revision",
    "make_engine",
    "open_db",
    "safe_url",
    "schema_revision",
    "to_url",
    "upgrade",
]
