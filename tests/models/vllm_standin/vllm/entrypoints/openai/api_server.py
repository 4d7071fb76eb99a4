"""Stand-in for `python -m vllm.entrypoints.openai.api_server` (and `vllm serve`): parses the flags vLLM
0.32's server takes that tuner's lines use (vllm/entrypoints/launchers/cli_args.py `make_arg_parser`,
vllm/engine/arg_utils.py `EngineArgs.add_cli_args`), checks them as the server does before loading, and
prints the settings as JSON instead of serving."""

from __future__ import annotations

import argparse
import json
import sys

from vllm import _checks


def _lora_module(item: str) -> dict[str, str]:
    # cli_args.py `LoRAParserAction`: `name=path`, or a JSON object.
    if "=" in item and "," not in item:
        name, path = item.split("=", 1)
        return {"name": name, "path": path}
    return json.loads(item)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("model_tag", nargs="?")
    parser.add_argument("--model")
    parser.add_argument("--dtype", choices=_checks.DTYPES, default="auto")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[])
    parser.add_argument("--max-lora-rank", type=int, choices=_checks.MAX_LORA_RANKS, default=16)
    parser.add_argument("--enable-tower-connector-lora", action="store_true")
    parser.add_argument("--mm-processor-kwargs", type=json.loads)
    parser.add_argument("--kv-cache-memory-bytes", type=_checks.human_readable_int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--allowed-local-media-path", default="")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, default=8000)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = args.model_tag or args.model
    if model is None:
        sys.exit("stand-in: no model given")
    _checks.check_model(model)
    _checks.check_media_folder(args.allowed_local_media_path)
    if args.lora_modules and not args.enable_lora:
        sys.exit("stand-in: --lora-modules without --enable-lora")
    for module in args.lora_modules:
        _checks.check_lora_folder(module["path"])
    settings = {name: value for name, value in vars(args).items() if name != "model_tag"}
    print(_checks.report({**settings, "model": model}))


if __name__ == "__main__":
    main()
