"""dialplan/: what a text check can prove. That the contexts work is proven on a real Asterisk (tests/pbx/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DIALPLAN = Path(__file__).parent.parent / "dialplan"
FILES = sorted(DIALPLAN.glob("*.conf"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_no_shell(path: Path) -> None:
    """Nothing shipped hands caller data to a shell: no SHELL(), System() or TrySystem() outside comments."""
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith(";"))
    assert code.strip() and not re.search(r"\b(SHELL|System|TrySystem)\s*\(", code, re.IGNORECASE)
