"""``lorayard <command> [flags]``: one command for the whole product, in the style of ``vllm serve``.

Each command hands its arguments, untouched, to the module that owns it, so ``lorayard serve ...`` is
``python -m lorayard.server ...``, ``lorayard train ...`` is ``python -m lorayard.train ...`` and
``lorayard chat ...`` is ``python -m lorayard.client chat ...``. Modules are imported only when their
command runs: ``lorayard chat`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lorayard import __version__

SERVER, JOB, CLIENT = "lorayard.server.__main__", "lorayard.train.__main__", "lorayard.client.__main__"
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (SERVER, "serve the base model and every adapter on the volume (OpenAI API)"),
    "train": (JOB, "fine-tune an adapter, evaluate it against the base, publish a version"),
    "generate": (JOB, "answer a prompt with an adapter, no server needed"),
    "merge": (JOB, "write base + adapter as one full model"),
    "promote": (JOB, "point LATEST at a published version, or start a canary"),
    "rollback": (JOB, "undo the last publish, promote or canary of an adapter"),
    "history": (JOB, "print an adapter's lifecycle history"),
    "chat": (CLIENT, "chat with an adapter on a running server"),
    "complete": (CLIENT, "complete a prompt on a running server"),
    "models": (CLIENT, "list the base and every adapter version a server serves"),
    "load-adapter": (CLIENT, "load a plain PEFT folder into a running server"),
    "unload-adapter": (CLIENT, "unload an adapter from a running server"),
    "health": (CLIENT, "exit 0 when a server is ready (the container probe)"),
    "loadtest": (CLIENT, "load-test a running server; latency report and plots"),
}
"""command -> (the module whose ``main(argv)`` runs it, its summary). The server takes no command word;
the job's and the client's parsers take theirs first, as ``python -m`` of their module does."""


def usage() -> str:
    lines = [
        f"lorayard {__version__}: one base model, many LoRA adapters",
        "",
        "usage: lorayard <command> ...",
    ]
    lines += [f"  {name:<15} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`lorayard <command> --help` shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"lorayard: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, _ = COMMANDS[args[0]]
    # imported by name and only here: `lorayard chat` loads the client alone, never torch
    command_main = importlib.import_module(module).main
    if module == CLIENT:  # its usage lines read `lorayard chat ...`, as typed
        status = command_main(args, prog="lorayard")
    else:
        status = command_main(args[1:] if module == SERVER else args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
