"""Alembic environment, run through Flask-Migrate (`flask db upgrade`). The app has configured
logging already, so the ini file's logging section is not applied here."""

from alembic import context
from flask import current_app

import app.models  # noqa: F401  (every model registers its table on the metadata)

config = context.config
database = current_app.extensions["migrate"].db
config.set_main_option("sqlalchemy.url", database.engine.url.render_as_string(hide_password=False).replace("%", "%%"))
target_metadata = database.metadata


def include_object(obj, name, type_, reflected, compare_to):
    """The job queue's tables (procrastinate_*) come from procrastinate's own schema, applied by a
    migration as it ships; autogenerate leaves them alone."""
    return not (type_ == "table" and str(name).startswith("procrastinate_"))


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = database.engine
    with connectable.connect() as connection:
        options = {
            **current_app.extensions["migrate"].configure_args,
            # SQLite (the development stand-in) alters tables by copying them.
            "render_as_batch": connection.dialect.name == "sqlite",
            "include_object": include_object,
        }
        context.configure(connection=connection, target_metadata=target_metadata, **options)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
