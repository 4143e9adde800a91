"""Static checks that run with the test suite: security lint and no credentials committed."""

import re
import subprocess
import sys
from pathlib import Path

from ml.config import PROJECT_ROOT

CODE_DIRS = ["ml", "dags", "bench"]


def test_security_lint_is_clean():
    """ruff's flake8-bandit rules (S*) over the product code; the ignores are listed in pyproject.toml."""
    targets = [d for d in CODE_DIRS if (PROJECT_ROOT / d).is_dir()]
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "S", "--ignore", "S101,S311,S603,S607", "--no-cache", *targets],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


_SECRET = re.compile(
    r"(postgres(ql)?://[^:@/\s]+:(?!\*\*\*|\$\{)[^@\s]+@)"  # a URL with an inline password
    r"|(AKIA[0-9A-Z]{16})"  # an AWS key
    r"|(-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)


def test_no_credentials_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.split()
    offenders = []
    for name in files:
        path = Path(PROJECT_ROOT, name)
        if path.suffix in {".png", ".gz", ".xlsx"} or not path.is_file():
            continue
        for line in path.read_text(errors="ignore").splitlines():
            if "not-a-secret" in line:  # a deliberate fake, e.g. a test that a password never leaks
                continue
            for match in _SECRET.finditer(line):
                offenders.append(f"{name}: {match.group(0)[:40]}")
    assert not offenders, offenders
