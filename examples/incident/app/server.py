#!/usr/bin/env python3
"""The admin dashboard of the incident, small enough to read in one go.

v1 lists documents(id, title). v2 also reads the two columns that migration 0002 adds,
so v2 against a database still at 0001 answers GET /admin/documents with a 500 and
the database's UndefinedColumn error: the 80-minute outage, reproduced.

Environment:
  APP_VERSION   v1 | v2 (default v1)
  DATABASE_URL  postgres://... or mysql://... (mariadb:// too); never printed
  POD_IP        address to listen on (default 127.0.0.1)
  PORT          port to listen on (default 8080)

Endpoints: GET /healthz (200 without touching the database, like the real app's probe,
which is why the broken pods looked healthy) and GET /admin/documents (JSON).
"""

import json
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

QUERIES = {
    "v1": "SELECT id, title FROM documents ORDER BY id",
    "v2": "SELECT id, title, uploaded_by_user_id, upload_notes FROM documents ORDER BY id",
}


def connect(url):
    """A DB-API connection for a postgres:// or mysql:// URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme in ("postgres", "postgresql"):
        import psycopg2

        # libpq parses postgres:// and postgresql:// URIs itself, query options included.
        dsn = "postgresql://" + url.split("://", 1)[1]
        return psycopg2.connect(dsn, connect_timeout=5)
    if scheme in ("mysql", "mariadb"):
        import pymysql

        return pymysql.connect(
            host=parts.hostname or "localhost",
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=unquote(parts.path.lstrip("/")) or None,
            connect_timeout=5,
        )
    raise ValueError(f"unsupported database URL scheme {parts.scheme!r}")


def scrub(message, url):
    """Removes the URL and its password from an error message before it is shown."""
    for secret in (url, unquote(urlsplit(url).password or ""), urlsplit(url).password or ""):
        if secret:
            message = message.replace(secret, "***")
    return message


class Dashboard(BaseHTTPRequestHandler):
    server_version = "admin-dashboard"
    version = "v1"
    database_url = ""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self.reply(200, {"status": "ok", "version": self.version})
        elif path == "/admin/documents":
            self.list_documents()
        else:
            self.reply(404, {"error": "NotFound", "message": f"no route {path}"})

    def list_documents(self):
        try:
            if not self.database_url:
                raise RuntimeError("DATABASE_URL is not set")
            connection = connect(self.database_url)
            try:
                with connection.cursor() as cursor:
                    cursor.execute(QUERIES[self.version])
                    columns = [column[0] for column in cursor.description]
                    rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
            finally:
                connection.close()
        except Exception as error:  # noqa: BLE001 - any database error is the 500 we want to show
            # The database's own words, as the dashboard showed them during the incident.
            message = scrub(str(error).strip(), self.database_url)
            self.reply(500, {"error": type(error).__name__, "message": message, "version": self.version})
            return
        self.reply(200, {"version": self.version, "documents": rows})

    def reply(self, status, body):
        payload = (json.dumps(body, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main():
    version = os.environ.get("APP_VERSION", "v1")
    if version not in QUERIES:
        sys.exit(f"APP_VERSION must be one of {', '.join(QUERIES)}, not {version!r}")
    host = os.environ.get("POD_IP") or "127.0.0.1"
    port = int(os.environ.get("PORT") or "8080")

    Dashboard.version = version
    Dashboard.database_url = os.environ.get("DATABASE_URL", "")

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Dashboard)
    # shutdown() blocks until serve_forever() returns, so it cannot run in the handler's thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"admin-dashboard {version} listening on {host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
