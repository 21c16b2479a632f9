"""The WSGI entry point for gunicorn (`gunicorn wsgi:app`). APP_ENV chooses the configuration; in
production an unsafe one stops the start-up with a message naming every problem."""

from app import create_app

app = create_app()
