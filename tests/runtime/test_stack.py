"""The library stack: known-broken combinations refused before any model loads, and the lock file
agreeing with pyproject.toml's ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from cli_runner import run_cli
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tuner.runtime import stack
from tuner.runtime.stack import StackError, check_stack, stack_problems

ROOT = Path(__file__).resolve().parents[2]
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1", "transformers": "5.23.0", "peft": "0.21.2"}


def test_the_tested_set_has_no_known_break():
    assert stack_problems(TESTED) == []
    check_stack(TESTED)


def test_transformers_5_24_beside_peft_0_21_is_refused_with_the_pin_to_install():
    versions = TESTED | {"transformers": "5.24.0"}
    [(problem, fix)] = stack_problems(versions)
    assert "transformers 5.24.0" in problem and "peft 0.21.2" in problem
    assert "transformers>=5.23,<5.24" in fix
    with pytest.raises(StackError, match="do not work together"):
        check_stack(versions)


@pytest.mark.parametrize(
    "versions",
    [
        TESTED | {"transformers": "5.24.0", "peft": "0.22.0"},  # the fixed peft lifts the rule
        TESTED | {"transformers": "5.24.0", "peft": None},  # no peft, nothing to refuse
        TESTED | {"torchvision": None},
        TESTED | {"torch": "2.14.1+cpu", "torchvision": "0.29.1+cpu"},  # local version labels
        TESTED | {"transformers": "5.24.0.dev0", "peft": "0.22.0.dev0"},
    ],
)
def test_combinations_that_work_pass(versions):
    assert stack_problems(versions) == []


def test_a_torchvision_built_for_another_torch_is_refused():
    [(problem, fix)] = stack_problems(TESTED | {"torchvision": "0.24.1"})
    assert "torchvision 0.24.1" in problem and "torch==2.14.1" in fix


def test_tuner_env_shows_the_verdict_and_merge_stops_before_loading(capsys, monkeypatch, tmp_path):
    broken = TESTED | {"transformers": "5.24.0"}
    monkeypatch.setattr(stack, "installed_versions", lambda packages=stack.STACK: dict(broken))
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert "library stack" in out and "FAIL transformers 5.24.0" in out
    code, _, err = run_cli(
        capsys, "merge", "--base", "tiny", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")
    )
    assert code == 2
    assert err.splitlines()[0].startswith("error: installed libraries do not work together")
    assert "hint: pip install 'transformers>=5.23,<5.24'" in err
    assert not (tmp_path / "m").exists()


def test_tuner_env_on_this_machine_reports_the_stack_ok(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and "library stack" in out and "ok: no known-broken combination" in out


def _locked() -> dict[str, str]:
    locked = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator, f"requirements-lock.txt: {line!r} is not NAME==VERSION"
            locked[canonicalize_name(name)] = version
    return locked


def test_every_locked_package_satisfies_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is required but not in requirements-lock.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements-lock.txt has {name}=={locked[name]}, outside pyproject's {requirement}"
        )


def test_the_locked_set_passes_the_known_break_rules():
    locked = _locked()
    assert {"torch", "torchvision"} <= set(locked)
    assert stack_problems({name: locked.get(canonicalize_name(name)) for name in stack.STACK}) == []


def test_the_latest_releases_check_can_go_past_the_guard(monkeypatch, caplog):
    monkeypatch.setenv("TUNER_IGNORE_KNOWN_BREAKS", "1")
    check_stack(TESTED | {"transformers": "5.24.0"})
    assert "going on although transformers 5.24.0" in caplog.text
