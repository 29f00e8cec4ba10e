"""Alembic environment: the database URL comes from DATABASE_URL and is never printed."""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

# URL schemes as operators and twelve-factor apps write them, mapped to the drivers
# this image ships. Schemes already naming a driver (postgresql+psycopg2://) pass through.
DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
}


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Say what is wrong without echoing the value: it may hold a password.
        raise SystemExit("DATABASE_URL is not set or is not a URL of the form scheme://...")
    return f"{DRIVERS.get(scheme.lower(), scheme)}://{rest}"


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    context.configure(
        url=database_url(),
        target_metadata=None,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # The URL goes straight to the engine, not through config.set_main_option: the ini
    # parser would choke on a '%' in a password, and the config may be logged.
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
