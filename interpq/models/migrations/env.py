"""Alembic environment: uses the engine handed over by ``interpq.models.db`` (or the settings')."""

from alembic import context

from interpq.models.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from interpq.models.db import make_engine
        from interpq.settings import get_settings

        engine = make_engine(get_settings().resolved_database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
