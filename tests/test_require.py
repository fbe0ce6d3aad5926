"""The suite's skip rules: a missing resource fails in CI; a CUDA test without a GPU is "not applicable", also in CI."""

from __future__ import annotations

import pytest
import torch  # before pytester snapshots sys.modules: torch cannot be imported twice

pytest_plugins = ["pytester"]

CASES = '''
import pytest
from tests.conftest import require

def test_needs_a_peer():
    require(False, "storescx is not installed")

@pytest.mark.requires_cuda
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()
'''


def _run(pytester: pytest.Pytester, monkeypatch, ci: bool) -> pytest.RunResult:
    from tests.conftest import REPO

    if ci:
        monkeypatch.setenv("DICOMNODE_REQUIRE_PEERS", "1")
    else:
        monkeypatch.delenv("DICOMNODE_REQUIRE_PEERS", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import pytest_runtest_setup  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    requires_cuda: needs a CUDA device\n")
    pytester.makepyfile(test_cases=CASES)
    return pytester.runpytest_subprocess("-ra", "-p", "no:cacheprovider")


def test_ci_fails_a_missing_peer_but_not_a_missing_gpu(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, ci=True)
    result.stdout.fnmatch_lines(["*required in CI: storescx is not installed*"])
    if torch.cuda.is_available():
        result.assert_outcomes(failed=1, passed=1)
    else:
        result.assert_outcomes(failed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED*not applicable: no CUDA device"])


def test_a_users_clone_skips_both_with_their_reasons(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, ci=False)
    result.stdout.fnmatch_lines(["SKIPPED*storescx is not installed"])
    result.assert_outcomes(skipped=1 if torch.cuda.is_available() else 2, passed=1 if torch.cuda.is_available() else 0)
