"""``python inference.py``: the web UI's command line (the MixLoRA README's "Run WebUI of Inference").

    python inference.py --base_model meta-llama/Llama-2-7b-hf \\
        --lora_weights TUDB-Labs/alpaca-mixlora-7b --template template/alpaca.json
    python inference.py --lora_weights output/            # every adapter of a run, side by side

Checks run before anything heavy loads: Gradio installed, the port free. Every problem a user
can fix (a missing adapter, an adapter for another base, a port in use ...) is printed as one
line with exit status 2, never a traceback. The page binds to 127.0.0.1 unless ``--host`` says
otherwise, and never opens a public share link.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from mlora.config import DTYPE_NAMES
from mlora.web.workspace import WebUIError

EXIT_BAD_INPUT = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
INSTALL_HINT = 'the web UI needs Gradio: pip install -e ".[web]" (or pip install gradio)'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference.py", description="A local web page that puts one instruction to "
                                "several adapters (LoRA, DoRA, MixLoRA, MixDoRA) and the base model, side by side.")
    p.add_argument("--base_model", help="hub id, local folder or .gguf file (default: the one every adapter config "
                                        "names)")
    p.add_argument("--lora_weights", nargs="+", required=True, metavar="ADAPTER",
                   help="adapter folders, Hugging Face Hub ids (owner/name), or the output folder of a run "
                        "(every adapter in it)")
    p.add_argument("--template", default="alpaca",
                   help="prompt template: 'alpaca' or a template JSON file (a missing template/alpaca.json means "
                        "the built-in 'alpaca')")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="base dtype (default fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def require_gradio():
    """The gradio module, or `WebUIError` saying how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise WebUIError(INSTALL_HINT) from err
    return gradio


def check_port(host: str, port: int) -> None:
    """Raise `WebUIError` unless `port` on `host` can be listened on now (the server binds it later)."""
    if not 0 < port < 65536:
        raise WebUIError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise WebUIError(f"--host {host!r} is not an address of this machine ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will: an address in TIME_WAIT from a page just closed is free to take.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise WebUIError(f"port {port} on {host} is in use (another page or program listens there); "
                                 "pass --port with a free one") from err
            raise WebUIError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --host or --port") from err


def serve(workspace, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, block: bool = True):
    """Build the page for `workspace` and serve it at ``http://host:port``; returns the page.

    `block` False returns once the server runs (tests; stop it with ``page.close()``).
    """
    from mlora.web.page import CSS, build_page

    page = build_page(workspace)
    page.queue(default_concurrency_limit=1)  # one model: answers run one after another
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False, quiet=True,
                ssr_mode=False, mcp_server=False, enable_monitoring=False, prevent_thread_lock=not block,
                footer_links=[], css=CSS)
    return page


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mlora.errors import MloraError, one_line

    try:
        require_gradio()
        check_port(args.host, args.port)
        from mlora.web.workspace import load_workspace

        workspace = load_workspace(args.lora_weights, base_model=args.base_model, template=args.template,
                                   dtype=args.dtype, device=args.device)
        check_port(args.host, args.port)  # loading may take minutes: still free?
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"mlora web UI: http://{shown}:{args.port} (base {workspace.base_model}; "
              f"{len(workspace.adapters)} adapter(s): {', '.join(workspace.adapters)}); Ctrl-C stops it", flush=True)
        if args.host not in (DEFAULT_HOST, "localhost", "::1"):
            print(f"note: --host {args.host} makes the page reachable from other machines", file=sys.stderr)
        serve(workspace, args.host, args.port)
    except (MloraError, OSError) as err:
        # OSError: a file that cannot be read, a tokenizer transformers cannot find, a port taken meanwhile.
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return 0
