"""A static HTTP server with byte ranges (``Range: bytes=a-b``, what GDAL's /vsicurl/ asks for,
as object stores serve cloud-optimised GeoTIFFs), for the tests of remote inputs.

    python tests/_range_server.py FOLDER      # prints the port, then serves FOLDER on 127.0.0.1
"""

from __future__ import annotations

import os
import re
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class RangeRequests(SimpleHTTPRequestHandler):
    """Static files, whole or by one byte range."""

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        first, last = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            first = int(match[1])
            last = min(int(match[2]) if match[2] else last, last)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(first)
                self.wfile.write(f.read(last - first + 1))

    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        self._send(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(body=False)


if __name__ == "__main__":
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeRequests, directory=sys.argv[1]))
    print(httpd.server_port, flush=True)
    httpd.serve_forever()
