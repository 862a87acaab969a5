"""Which job store ``--store`` names, opened: the embedded SQLite one (``jobstore.py``) or
the shared PostgreSQL one (``pgstore.py``, and psycopg, imported only then). Here, apart
from both, so that neither store's module imports the other's.

Standard library only, Python 3.9.
"""

from __future__ import annotations

from pathlib import Path

from .jobstore import DB_NAME, POSTGRES_SCHEMES, SCHEMA_VERSION, SQLiteStore, Store, StoreError


def open_store(url: str | None, state_dir: Path) -> Store:
    """The store ``--store`` names: ``sqlite:///PATH``, ``postgresql://USER@HOST[:PORT]/DB``
    (psycopg imported only then), or by default ``STATE_DIR/serve.db``."""
    if not url:
        return SQLiteStore(state_dir / DB_NAME)
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite://"):]))
    if url.startswith(POSTGRES_SCHEMES):
        from .pgstore import PostgresStore

        return PostgresStore(url)
    scheme = url.partition(":")[0] or url
    raise StoreError(f"--store {scheme}: this bin/serve knows sqlite:///PATH and "
                     f"postgresql://USER@HOST[:PORT]/DB (the default is {state_dir / DB_NAME})")


def init_store(url: str | None, state_dir: Path) -> tuple[int | None, int]:
    """``bin/serve store init|migrate``: the schema created or brought up to date,
    ``(version found, version now)``. SQLite makes its own when opened."""
    if url and url.startswith(POSTGRES_SCHEMES):
        from .pgstore import PostgresStore

        store = PostgresStore(url, check_schema=False)
        try:
            return store.migrate()
        finally:
            store.close()
    open_store(url, state_dir).close()
    return SCHEMA_VERSION, SCHEMA_VERSION
