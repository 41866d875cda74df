"""``python -m client.web --triton HOST:PORT [--host 127.0.0.1 --port 8080]``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m client.web",
        description="Live web playground: answer and reasoning streams side by side, input while it runs.",
    )
    p.add_argument(
        "--triton", default="localhost:8001", help="Triton gRPC address host:port (default %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to serve the page on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to serve the page on (default %(default)s)")
    p.add_argument("--model", default="multistream", help="ensemble name (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print(
            "error: the playground needs uvicorn and starlette (scripts/setup.sh installs them)",
            file=sys.stderr,
        )
        return 1
    from .app import create_app

    app = create_app(args.triton, model_name=args.model)
    print(f"playground: http://{args.host}:{args.port}/  (Triton gRPC {args.triton})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
