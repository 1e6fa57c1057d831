"""The Python examples of the Markdown docs, for the tests that check and run them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
"""Every Markdown page whose examples are checked."""


def python_blocks(path: Path) -> list[tuple[str, int, str]]:
    """Every ```python block of a Markdown file: (marker, line, code).

    The marker is the HTML comment on the line before the fence: ``runnable`` (the test
    in tests/e2e/test_first_hour.py runs it against `tensafe up`) or ``signature``
    (call shapes, not run); "" when there is none.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            previous = lines[index - 1].strip() if index else ""
            marker = previous.removeprefix("<!-- ").removesuffix(" -->") if (
                previous.startswith("<!-- ")
            ) else ""
            end = lines.index("```", index + 1)
            blocks.append((marker, index + 1, "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks
