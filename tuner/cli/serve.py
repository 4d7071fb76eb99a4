"""`tuner serve-command RUN`: the vLLM command lines for a Qwen-VL adapter (what `serve.md` holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve_command(
    adapter: Annotated[Path, typer.Argument(help="The Qwen-VL adapter folder (a training run's output).")],
    write: Annotated[bool, typer.Option("--write", help="Also (re)write serve.md in the folder.")] = False,
) -> None:
    """Print how to serve a Qwen-VL adapter with vLLM: server, offline LLM(...) and the merged model."""
    from tuner.models.qwenvl_serve import read_serve_facts, serve_markdown, write_serve_file

    print(serve_markdown(read_serve_facts(adapter)), end="")
    if write:
        print(f"wrote {write_serve_file(adapter)}")
