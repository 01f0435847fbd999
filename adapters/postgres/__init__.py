"""The Postgres adapter (asyncpg): the directory, status writes and migrations."""

from adapters.postgres.directory import DirectoryLoadError, PostgresDirectory
from adapters.postgres.migrations import MigrationError, available_migrations, migrate

__all__ = [
    "DirectoryLoadError",
    "MigrationError",
    "PostgresDirectory",
    "available_migrations",
    "migrate",
]
