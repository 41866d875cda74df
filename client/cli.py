"""``multistream`` command: ask a question, watch the answer and the reasoning streams live.

The answer and each reasoning stream get their own panel, side by side, so
the point of the model (the answer does not wait for the thinking) is
visible; afterwards a table gives TTFT and tokens/s per stream. ``--json``
prints one JSON object instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .core import DEFAULT_URLS, IDLE_TIMEOUT_S
from .errors import MultiStreamError
from .events import Done, StreamDelta
from .request import OPTIONS, Param
from .sync import MultiStreamClient


def build_parser() -> argparse.ArgumentParser:
    """Argument parser (separate so tests can check argument handling without a server).

    The request flags are derived from ``GenerateRequest``'s fields (``--max-tokens`` for
    ``max_tokens``...), so a new request parameter needs no edit here.
    """
    p = argparse.ArgumentParser(
        prog="multistream",
        description="Stream an answer and background reasoning from the multistream Triton model.",
    )
    p.add_argument(
        "prompt", nargs="?", help="the prompt; read from stdin when omitted (not with --interactive)"
    )
    p.add_argument(
        "--url", default=None, help="server host:port (default localhost:8001 for grpc, :8000 for http)"
    )
    p.add_argument("--protocol", choices=tuple(DEFAULT_URLS), default="grpc")
    request = p.add_argument_group("request options (the fields of client.request.GenerateRequest)")
    for param in OPTIONS.values():
        _add_option(request, param)
    p.add_argument("--json", action="store_true", help="print one JSON object (no live view)")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="lines typed while the answer streams are pushed into the session (User channel)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=IDLE_TIMEOUT_S,
        help="seconds without any response before giving up (default %(default)s)",
    )
    return p


def option_flag(param: Param) -> str:
    """The CLI flag of a request option: ``max_tokens`` -> ``--max-tokens``."""
    return "--" + param.name.replace("_", "-")


def _add_option(parser: argparse._ActionsContainer, param: Param) -> None:
    flag = option_flag(param)
    if param.pytype is bool:  # --stream / --no-stream
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=param.default, help=param.help
        )
    elif param.repeated:
        parser.add_argument(flag, action="append", type=_converter(param), default=None, help=param.help)
    elif param.choices:
        parser.add_argument(flag, choices=param.choices, default=param.ui_default, help=param.help)
    else:
        default = param.ui_default if param.ui_default is not None else param.default
        notes = [n for n in (param.rule, None if default is None else f"default {default}") if n]
        help_text = f"{param.help} ({'; '.join(notes)})" if notes else param.help
        parser.add_argument(flag, type=_converter(param), default=default, help=help_text)


def _converter(param: Param) -> Any:
    """argparse ``type=``: the option's own parsing and rule, as a clean argparse error."""

    def convert(text: str) -> Any:
        try:
            return param.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """CLI arguments -> ``MultiStreamClient.generate`` keyword arguments (every option)."""
    return {name: getattr(args, name) for name in OPTIONS}


class _Pusher:
    """Reads stdin on a thread and pushes each line into the running session.

    A thread (not the render loop) because ``input()`` blocks; pushes go over
    their own client so they never queue behind the stream.
    """

    def __init__(self, client: MultiStreamClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.pushed: list[str] = []
        self.notes: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stdin-pusher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _push(self, text: str) -> bool:
        """Pushes ``text``, waiting while the server does not know the session yet.

        Why wait: the session id is the client's, but ``session_control`` only knows a session
        once ``decode`` has started it (after preprocessing and prefill), so a line typed (or
        piped) at once would be refused as "not a running session". Until the generation
        ends (``stop``), that answer means "not yet".
        """
        while True:
            try:
                return self.client.push_input(self.session_id, text)
            except MultiStreamError as exc:
                if "not a running session" not in str(exc) or self._stop.wait(0.05):
                    raise

    def _run(self) -> None:
        for line in sys.stdin:
            if self._stop.is_set():
                return
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                ok = self._push(text + "\n")
                self.pushed.append(text)
                if not ok:
                    self.notes.append(f"not accepted: {text!r}")
            except MultiStreamError as exc:
                self.notes.append(f"push failed: {exc}")


def _render(texts: dict[str, str], pusher: _Pusher | None, full: bool, console: Any) -> Any:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    names = ["output"] + sorted(n for n in texts if n != "output")
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in names:
        grid.add_column(ratio=1)
    width = max(20, console.width // max(1, len(names)) - 4)
    lines = max(4, console.height - 10)
    cells = []
    for n in names:
        text = texts.get(n, "")
        if not full and len(text) > width * lines:
            text = "…" + text[-width * lines :]
        title = {"output": "answer", "user": "user (as read by the model)"}.get(n, n)
        style = "bold green" if n == "output" else "cyan"
        cells.append(Panel(Text(text), title=title, border_style=style))
    grid.add_row(*cells)
    if pusher is None:
        return grid
    outer = Table.grid(expand=True)
    outer.add_row(grid)
    you = (
        "\n".join(f"> {t}" for t in pusher.pushed[-5:] + pusher.notes[-2:])
        or "(type and press Enter to add input)"
    )
    outer.add_row(Panel(Text(you), title="you", border_style="magenta"))
    return outer


def _stats_table(done: Done) -> Any:
    from rich.table import Table

    t = Table(title="per stream", show_lines=False)
    for col in ("stream", "TTFT s", "tokens", "tokens/s", "finish"):
        t.add_column(col, justify="right" if col not in ("stream", "finish") else "left")
    for name in done.tokens:
        ttft = done.ttft_s.get(name)
        rate = done.tokens_per_s.get(name)
        t.add_row(
            name,
            "-" if ttft is None else f"{ttft:.3f}",
            str(done.tokens[name]),
            "-" if rate is None else f"{rate:.1f}",
            done.finish_reasons.get(name, ""),
        )
    t.caption = f"total {done.total_s:.2f}s  session {done.session_id or '-'}"
    return t


def run(args: argparse.Namespace) -> int:
    """Execute the command; returns the exit code."""
    from rich.console import Console
    from rich.live import Live

    err = Console(stderr=True)
    prompt = args.prompt
    if prompt is None:
        if args.interactive:
            err.print("error: --interactive needs the prompt as an argument (stdin carries the pushes)")
            return 2
        if sys.stdin.isatty():
            err.print("error: no prompt (pass it as an argument or pipe it on stdin)")
            return 2
        prompt = sys.stdin.read()
    if not prompt or not prompt.strip():
        err.print("error: empty prompt")
        return 2
    kwargs = generate_kwargs(args)

    client = MultiStreamClient(args.url, args.protocol, idle_timeout_s=args.timeout)
    pusher: _Pusher | None = None
    gen = None
    try:
        gen = client.generate(prompt, **kwargs)
        if args.interactive:
            # The session id is chosen client side, so pushes can start before the first token.
            assert gen.session_id is not None
            pusher = _Pusher(MultiStreamClient(args.url, args.protocol), gen.session_id)
            pusher.start()
        texts: dict[str, str] = {"output": ""}
        done: Done | None = None
        if args.json:
            done = gen.result()
        else:
            console = Console()
            events = iter(gen)
            first = next(events)  # before the live view: a dead server then prints one clean line
            with Live(
                _render(texts, pusher, False, console),
                console=console,
                refresh_per_second=12,
                vertical_overflow="visible",
            ) as live:
                for ev in _chain(first, events):
                    if isinstance(ev, StreamDelta):
                        texts[ev.stream] = texts.get(ev.stream, "") + ev.text
                        live.update(_render(texts, pusher, False, console))
                    else:
                        done = ev
                live.update(_render(texts, pusher, True, console))
            assert done is not None
            console.print()
            console.print(_stats_table(done))
        if args.json:
            assert done is not None
            obj = done.to_dict()
            if pusher is not None:
                obj["pushed_inputs"] = list(pusher.pushed)
            print(json.dumps(obj, ensure_ascii=False))
        return 0
    except MultiStreamError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except ValueError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        if gen is not None:
            gen.cancel()  # closes the stream and cancels the session through session_control
        err.print("cancelled")
        return 130
    finally:
        if pusher is not None:
            pusher.stop()
        client.close()


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``multistream``)."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
