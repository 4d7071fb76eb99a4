"""Run the `tuner` CLI in-process the way the console script does, capturing its exit code and output."""

from tuner.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
