"""kernels/ is the engine and its kernels: it never imports agent/ (the protocol, sessions and CLI sit on top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def agent_imports(source: str, filename: str = "<source>") -> list[str]:
    """'line: statement' for every import of agent (absolute, or relative reaching above kernels/), anywhere in the
    file (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "agent"]
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            names = [f"{'.' * node.level}{node.module or ''}"] if (node.level == 0 and top == "agent") or node.level > 1 else []
        else:
            continue
        found += [(node.lineno, n) for n in names]
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_the_scan_finds_every_form_of_import():
    src = "import os\nimport agent\nimport agent.vocab as v\ndef f():\n    from agent.reference import x\nfrom ..agent import y\nfrom kernels import agentish\nimport agentx\n"
    assert agent_imports(src) == ["2: agent", "3: agent.vocab", "5: agent.reference", "6: ..agent"]


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: str(p.relative_to(KERNELS)))
def test_kernels_never_import_agent(path):
    assert agent_imports(path.read_text(), str(path)) == [], f"{path.relative_to(KERNELS.parent)} imports agent/"
