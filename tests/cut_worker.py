"""A worker as `flask billing worker` runs it (queue.run_worker), on the "cut" queue, with two test
tasks: `cut:wait_for` returns once a file exists (the test makes it when it is ready to cut the
connection on which the worker then records the job's outcome), `cut:after` does nothing."""

from __future__ import annotations

import time
from pathlib import Path

import procrastinate

from app.services import queue
from wsgi import app

tasks = procrastinate.Blueprint()


@tasks.task(name="wait_for")
def wait_for(path: str) -> None:
    deadline = time.monotonic() + 30
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@tasks.task(name="after")
def after() -> None:
    return None


queue.register_blueprint("cut", tasks)

if __name__ == "__main__":
    queue.run_worker(app, queues=["cut"], concurrency=1)
