"""The library stack: known-broken combinations refused before any model loads, and the lock file
agreeing with pyproject.toml's ranges."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from cli_runner import run_cli
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tuner.runtime import stack
from tuner.runtime.stack import StackError, check_stack, stack_problems

ROOT = Path(__file__).resolve().parents[2]
# The lock (2026-12-07) and the oldest set pyproject allows, which the suite also passed on.
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1", "transformers": "5.25.0", "peft": "0.22.0"}
OLDEST = TESTED | {"transformers": "5.23.0", "peft": "0.21.2"}


@pytest.mark.parametrize("versions", [TESTED, OLDEST])
def test_the_tested_sets_have_no_known_break(versions):
    assert stack_problems(versions) == []
    check_stack(versions)


def test_transformers_5_24_beside_peft_0_21_is_refused_with_the_peft_to_install():
    versions = OLDEST | {"transformers": "5.24.0"}
    [(problem, fix)] = stack_problems(versions)
    assert "transformers 5.24.0" in problem and "peft 0.21.2" in problem
    assert "peft>=0.22" in fix
    with pytest.raises(StackError, match="do not work together"):
        check_stack(versions)


@pytest.mark.parametrize(
    "versions",
    [
        OLDEST | {"transformers": "5.24.0", "peft": "0.22.0"},  # the fixed peft lifts the rule
        OLDEST | {"transformers": "5.24.0", "peft": None},  # no peft, nothing to refuse
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
    broken = OLDEST | {"transformers": "5.24.0"}
    monkeypatch.setattr(stack, "installed_versions", lambda packages=stack.STACK: dict(broken))
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert "library stack" in out and "FAIL transformers 5.24.0" in out
    code, _, err = run_cli(
        capsys, "merge", "--base", "tiny", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")
    )
    assert code == 2
    assert err.splitlines()[0].startswith("error: installed libraries do not work together")
    assert "hint: pip install 'peft>=0.22'" in err
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
    check_stack(OLDEST | {"transformers": "5.24.0"})
    assert "going on although transformers 5.24.0" in caplog.text


def test_the_ascend_constraint_set_is_the_lock_with_a_torch_npu_trio():
    text = (ROOT / "constraints-ascend.txt").read_text()
    assert text == stack.ascend_constraints((ROOT / "requirements-lock.txt").read_text()), (
        "constraints-ascend.txt is stale: run python scripts/ascend_constraints.py"
    )
    lines = [line.partition("==") for line in text.splitlines() if not line.startswith("#")]
    pinned = {canonicalize_name(name): version for name, _, version in lines}
    trio = stack.PIP_ASCEND_TRIO
    assert (pinned["torch"], pinned["torchvision"], pinned["torch-npu"]) == (
        trio.torch,
        trio.torchvision,
        trio.torch_npu,
    )
    # Everything else exactly as locked; the lock's CUDA torch and its CUDA wheels are gone.
    locked = _locked()
    for name, version in pinned.items():
        if name not in ("torch", "torchvision", "torch-npu"):
            assert locked[name] == version, name
    assert not [name for name in pinned if name.startswith(("nvidia-", "cuda-")) or name == "triton"]
    # Each trio passes the stack rules, and torch_npu X.Y.Z needs torch X.Y.Z (its Requires-Dist).
    for listed in stack.ASCEND_TRIOS:
        assert stack_problems(TESTED | {"torch": listed.torch, "torchvision": listed.torchvision}) == []
        assert listed.torch_npu.split(".")[:3] == listed.torch.split(".")[:3]
    # pyproject's ascend extra admits the trio's torch-npu.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [extra] = [Requirement(text) for text in project["optional-dependencies"]["ascend"]]
    assert extra.specifier.contains(trio.torch_npu)


def test_dockerfile_ascend_installs_a_listed_trio():
    dockerfile = (ROOT / "Dockerfile.ascend").read_text()
    [trio] = [t for t in stack.ASCEND_TRIOS if t.source == "Dockerfile.ascend"]
    for pin in (
        f'"torch=={trio.torch}',
        f'"torchvision=={trio.torchvision}',
        f'"torch-npu=={trio.torch_npu}',
    ):
        assert pin in dockerfile, pin
    assert f"cann:{trio.cann}-" in dockerfile


@pytest.mark.parametrize(
    ("torch", "torch_npu", "cann", "source"),
    [
        ("2.14.0", "2.14.0", "9.1.0", "constraints-ascend.txt"),
        ("2.14.0+cpu", "2.14.0.post2", "9.1.0.alpha001", "constraints-ascend.txt"),
        ("2.12.0", "2.12.0", "9.1.0", "Dockerfile.ascend"),
        ("2.14.1", "2.14.0", "9.1.0", None),  # the lock's torch: torch_npu 2.14.0 refuses it
        ("2.14.0", "2.14.0", "8.5.0", None),
        ("2.14.0", "2.14.0", "9.10.0", None),
        ("2.14.0", "2.14.0", None, None),
    ],
)
def test_ascend_trios_are_recognised_by_version(torch, torch_npu, cann, source):
    trio = stack.ascend_trio_of(torch, torch_npu, cann)
    assert (trio.source if trio else None) == source
