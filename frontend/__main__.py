"""``python -m frontend --triton localhost:8001 --port 9000``: serve the OpenAI API."""

from __future__ import annotations

import argparse
import sys

from .settings import API_KEY_ENV, FrontSettings


def build_parser() -> argparse.ArgumentParser:
    d = FrontSettings(api_key=None)
    p = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    p.add_argument(
        "--triton", default=d.triton, help="Triton address (gRPC host:port; HTTP with --protocol http)"
    )
    p.add_argument("--protocol", default=d.protocol, choices=("grpc", "http"))
    p.add_argument(
        "--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 with an API key)"
    )
    p.add_argument("--port", type=int, default=9000)
    p.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})"
    )
    p.add_argument("--ensemble", default=d.ensemble, help="the Triton model to call")
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: --ensemble)"
    )
    p.add_argument(
        "--max-concurrent", type=int, default=d.max_concurrent, help="generations at once; more get 429"
    )
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="s without a server response")
    p.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )
    return p


def settings_from(args: argparse.Namespace) -> FrontSettings:
    s = FrontSettings(
        triton=args.triton,
        protocol=args.protocol,
        ensemble=args.ensemble,
        served_model_name=args.served_model_name or args.ensemble,
        max_concurrent=args.max_concurrent,
        default_max_tokens=args.default_max_tokens,
        idle_timeout_s=args.idle_timeout,
    )
    if args.api_key:
        s.api_key = args.api_key
    return s


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from .app import create_app

    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    host = args.host or settings.host_default()
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"frontend: WARNING: listening on {host} without an API key", file=sys.stderr)
    print(
        f"OpenAI API  http://{host}:{args.port}/v1  (model {settings.served_model_name!r}, Triton {settings.triton})",
        flush=True,
    )
    uvicorn.run(create_app(settings), host=host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
