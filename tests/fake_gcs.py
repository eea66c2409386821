"""A fake Google Cloud Storage for tests: gs:// workdirs end to end, with no network.

orbax writes a checkpoint's arrays through tensorstore, which speaks the GCS JSON API to
TENSORSTORE_GCS_HTTP_URL (`serve`); everything else (orbax's metadata, the loop's metrics,
summary and plots) goes through etils.epath, which `patch_process` maps onto the files the
server keeps: etils' mock_epath resolves gs://bucket/x to ./gs:/bucket/x, so the process
runs in the server's root. `python tests/fake_gcs.py ARGS` runs the command line
(hybrid_jax.main) patched so.
"""

import contextlib
import http.server
import json
import runpy
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from unittest import mock


class _FakeGCS(http.server.BaseHTTPRequestHandler):
    """The GCS JSON API calls tensorstore makes (media read/upload, list, delete, generation preconditions),
    serving objects as files under `root`/{bucket}/{name}: the files epath sees at "gs://..." under
    etils' mock_epath, which maps gs://bucket/x to the relative path gs:/bucket/x."""

    root: Path

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _target(self) -> tuple[str, str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        bucket, _, name = url.path.split("/b/", 1)[1].partition("/o")
        return bucket, query.get("name") or urllib.parse.unquote(name.lstrip("/")), query

    @staticmethod
    def _generation(file: Path) -> str:
        return str(file.stat().st_mtime_ns) if file.is_file() else "0"

    def _refused(self, file: Path, query: dict[str, str]) -> int | None:
        if "ifGenerationMatch" in query and query["ifGenerationMatch"] != self._generation(file):
            return 412
        if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"] == self._generation(file):
            return 304
        return None

    def do_GET(self):
        bucket, name, query = self._target()
        if not name:  # list
            base = self.root / bucket
            names = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.exists() else []
            names = [n for n in names if n.startswith(query.get("prefix", "")) and n >= query.get("startOffset", "")
                     and n < query.get("endOffset", "\U0010ffff")]
            items = [{"name": n, "size": str((base / n).stat().st_size), "generation": self._generation(base / n)}
                     for n in names]
            return self._reply(200, json.dumps({"items": items}).encode(), {"Content-Type": "application/json"})
        file = self.root / bucket / name
        if not file.is_file():
            return self._reply(404)
        if code := self._refused(file, query):
            return self._reply(code)
        data, generation = file.read_bytes(), self._generation(file)
        if query.get("alt") != "media":
            meta = {"name": name, "bucket": bucket, "size": str(len(data)), "generation": generation}
            return self._reply(200, json.dumps(meta).encode(), {"Content-Type": "application/json"})
        if byte_range := self.headers.get("Range"):
            first, last = byte_range.removeprefix("bytes=").split("-")
            first, last = int(first), int(last) if last else len(data) - 1
            return self._reply(206, data[first:last + 1], {"x-goog-generation": generation,
                                                            "Content-Range": f"bytes {first}-{last}/{len(data)}"})
        self._reply(200, data, {"x-goog-generation": generation})

    def do_POST(self):
        bucket, name, query = self._target()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        file = self.root / bucket / name
        if self._refused(file, query):
            return self._reply(412)
        file.parent.mkdir(parents=True, exist_ok=True)
        staged = file.with_name(file.name + ".upload")
        staged.write_bytes(body)
        staged.replace(file)
        meta = {"name": name, "bucket": bucket, "size": str(len(body)), "generation": self._generation(file)}
        self._reply(200, json.dumps(meta).encode(), {"Content-Type": "application/json"})

    def do_DELETE(self):
        bucket, name, query = self._target()
        file = self.root / bucket / name
        if not file.is_file():
            return self._reply(404)
        if self._refused(file, query):
            return self._reply(412)
        file.unlink()
        self._reply(204)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[dict[str, str]]:
    """A fake GCS endpoint keeping objects under {root}/gs:/{bucket}/; yields the environment tensorstore reads."""
    handler = type("Handler", (_FakeGCS,), {"root": Path(root) / "gs:"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{server.server_address[1]}",
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}
    finally:
        server.shutdown()


@contextlib.contextmanager
def patch_process() -> Iterator[None]:
    """epath's gs:// onto ./gs:/ in this process (run it in the server's root)."""
    from etils.epath import testing as epath_testing
    from orbax.checkpoint._src.path import gcs_utils

    # orbax asks google-cloud-storage whether the bucket has a hierarchical namespace before listing steps.
    with mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False), \
            epath_testing.mock_epath():
        yield


if __name__ == "__main__":
    with patch_process():
        runpy.run_module("hybrid_jax.main", run_name="__main__")
