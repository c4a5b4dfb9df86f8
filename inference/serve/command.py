"""``calcinosis serve``: its arguments and the function that runs it.

The command itself is declared in :mod:`calcinosis.inference.cli` (``serve``,
registered under the ``calcinosis.commands`` entry points). Declaring the
options imports nothing heavy (``calcinosis --help`` stays instant); the web
stack and the model load only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from calcinosis.model.cli import add_tta_argument
from calcinosis.model.errors import CalcinosisError

LOOPBACK = "127.0.0.1"

HELP = "a local web page: drop patches, open slides, see calls and deposit maps"
DESCRIPTION = (
    "Start a local web server with a page for pathologists: drag and drop images "
    "(PNG, JPEG, TIFF) to get the calibrated call, the stain and the deposit map, and "
    "download the same CSV, JSON, GeoJSON and overlay PNG that `calcinosis predict` "
    "writes; open whole slides under --slides in a deep-zoom viewer and predict regions "
    "on demand. Bound to 127.0.0.1 (this computer only) unless --host says otherwise."
)


def serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``calcinosis serve`` (on the sub-parser the dispatcher made)."""
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint (.safetensors) or exported .onnx"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to listen on (default 127.0.0.1: only this computer can connect; "
        "0.0.0.0 opens the page to the network, without any login)",
    )
    p.add_argument(
        "--slides",
        default=None,
        metavar="DIR",
        help="folder of whole-slide files (.svs .ndpi .scn .bif, tiled .tif) to browse; nothing "
        "outside it is ever opened",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "torch-eager", "torch-bf16", "onnx", "onnx-int8"],
        help="as for predict (default torch)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="call 'indeterminate' below this calibrated top probability (default: the checkpoint's)",
    )
    add_tta_argument(p)  # as predict: patches the checkpoint's mode, regions and slides none
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=256.0,
        help="largest upload accepted, in MB (default 256)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest uploaded image (width x height) decoded (default: predict's, 100000000)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the uploads and results in this folder (default: a temporary folder, "
        "deleted when the server stops)",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, bind the socket, print the address, serve until interrupted."""
    import uvicorn

    from .app import ServeConfig, create_app

    checkpoint = Path(args.checkpoint)
    slides = None
    if args.slides:
        slides = Path(args.slides)
        if not slides.is_dir():
            raise CalcinosisError(f"--slides {slides} is not a folder; give the folder of slides")
    if args.max_upload_mb <= 0:
        raise CalcinosisError(f"--max-upload-mb must be > 0; got {args.max_upload_mb}")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise CalcinosisError(f"--max-pixels must be >= 0 (0 = no limit); got {args.max_pixels}")
    predictor = load_predictor(args)
    print(predictor.describe_tta(), flush=True)
    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="calcinosis-serve-")) if temp else Path(args.work_dir)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = ServeConfig(
        checkpoint=checkpoint,
        work_dir=work,
        slides_dir=slides,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        allowed_hosts=allowed_hosts(args.host),
    )
    app = create_app(predictor, config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"calcinosis serve: the page is at http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    if not _is_loopback(args.host):
        print(
            f"warning: listening on {args.host}: anyone who can reach this computer can use the "
            "page and see its results; there is no login",
            file=sys.stderr,
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        app.state.close()
        sock.close()
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def load_predictor(args: argparse.Namespace):
    """The model as ``serve`` runs it: predict's defaults for everything it does not set.

    (Batch size, tile overlap, focus and lesion settings as ``calcinosis predict``
    leaves them, so the page's numbers are the command line's to the last digit.)
    """
    from calcinosis.inference.predictor import Predictor

    return Predictor.from_checkpoint(
        Path(args.checkpoint),
        backend=args.backend,
        device=args.device,
        indeterminate_threshold=args.threshold,
        tta=args.tta,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the system picks), or a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CalcinosisError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program may use "
            "the port: pick another with --port N (or --port 0 for any free one)"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def allowed_hosts(host: str) -> list[str]:
    """Host header values the server answers (the rest get 400: DNS rebinding)."""
    if host in ("0.0.0.0", "::"):
        return ["*"]
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    if host not in hosts:
        hosts.append(f"[{host}]" if ":" in host else host)
    return hosts


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BackgroundServer:
    """The app served by uvicorn in a thread, on ``host`` and a free port (benchmarks, tests).

    ``with BackgroundServer(app) as srv: urlopen(srv.url + "api/model")``; leaving
    the block stops the server and waits for its thread.
    """

    def __init__(self, app: object, host: str = LOOPBACK, port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = ""
        self._server: object | None = None
        self._thread: object | None = None
        self._sock: socket.socket | None = None

    def __enter__(self) -> BackgroundServer:
        import threading
        import time

        import uvicorn

        self._sock = bind_socket(self.host, self.port)
        port = self._sock.getsockname()[1]
        self.url = f"http://{self.host}:{port}/"
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._server = server
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [self._sock]},
            name="calcinosis-serve",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the page's server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if thread is not None:
            thread.join(10)  # type: ignore[attr-defined]
        if self._sock is not None:
            self._sock.close()
