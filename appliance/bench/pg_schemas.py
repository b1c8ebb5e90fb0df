"""Where ``bench hub --postgres`` writes: schemas of its own, seen through their URLs only, dropped at the end."""

from __future__ import annotations

import contextlib
import secrets
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from appliance.bench.errors import BenchError


class PgSchemas:
    """Private schemas in the given PostgreSQL database, dropped at the end: the bench leaves no rows behind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def new(self, purpose: str) -> str:
        """A fresh schema; returns the URL whose connections see only it (search_path)."""
        import psycopg

        name = f"edugate_bench_{purpose}_{secrets.token_hex(4)}"
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE SCHEMA "{name}"')
        except psycopg.Error as exc:
            raise BenchError(f"--postgres: cannot create a schema: {str(exc).strip().splitlines()[0]}") from None
        self.created.append(name)
        return with_search_path(self.url, name)

    def drop(self) -> None:
        import psycopg

        if not self.created:
            return
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        self.created.clear()


def with_search_path(url: str, schema: str) -> str:
    """The URL with ``options=-c search_path=SCHEMA`` added to what its query already says."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = (query.get("options", "") + f" -c search_path={schema}").strip()
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))  # libpq reads no '+' as space
