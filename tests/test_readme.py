"""The README's two commands are the ones CI and newcomers actually run."""

from __future__ import annotations

import re

from conftest import ROOT


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands() -> None:
    main_job, tests = _readme_commands()
    assert "pip install" in main_job and "rpp-train fit --config configs/" in main_job
    config = re.search(r"--config (\S+)", main_job).group(1)
    assert (ROOT / config).is_file(), f"the README's main job names a missing config {config}"
    assert "pip install" in tests and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run must run the README's test command verbatim: {tests}"
