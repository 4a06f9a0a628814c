"""User-store backends for tests: SQLite in a temporary folder, and a real PostgreSQL server started on 127.0.0.1."""

from __future__ import annotations

import itertools
import shutil

import pytest

from trl_micro.testing_utils import LocalPostgres

from .conftest import skip_unless_strict

_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server():
    """One private PostgreSQL server for the test session (a fresh database per test: `store_url`)."""
    if shutil.which("pg_ctl") is None and not __import__("glob").glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        skip_unless_strict("PostgreSQL's server programs are not installed (.ci/run installs them)")
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The URL of an empty user store on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'users.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"store_{next(_database_numbers)}")
