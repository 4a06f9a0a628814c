"""
The Studies section of BENCHMARKS.md: the reports of benchmarks/studies/, embedded as they stand.

A study answers one question with its own command (the first line of its report names it) and is rerun on its own
schedule; `run_all.py` embeds the reports the plan lists when it writes BENCHMARKS.md, and
`run_all.py --refresh_studies` re-embeds them into the existing file after a study reruns, leaving the rest of it
as it was. Headings move two levels down and relative links are rewritten to resolve from BENCHMARKS.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SECTION_HEADING = "## Studies"
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#+) ")


def _relink(line: str, report: Path, document: Path) -> str:
    def rewrite(match: re.Match) -> str:
        target = match.group(1)
        if re.match(r"^([a-z]+:|#|/)", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        moved = Path(os.path.relpath(report.parent / path, document.parent)).as_posix()
        return f"]({moved}{'#' + anchor if anchor else ''})"

    return _LINK.sub(rewrite, line)


def embed_report(report: Path, document: Path) -> list[str]:
    """`report`'s lines as a subsection of `document`: headings two levels down, relative links rewritten."""
    lines, fenced = [], False
    for line in report.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced:
            line = _relink(_HEADING.sub(lambda match: "#" * (len(match.group(1)) + 2) + " ", line), report, document)
        lines.append(line)
    return lines


def studies_section(reports: list[Path], document: Path) -> list[str]:
    """The section: an introduction, then each report in `reports` (or a note naming a report not written yet)."""
    lines = [
        SECTION_HEADING,
        "",
        "Studies of one question each, embedded from their reports under `benchmarks/studies/results/`; each report "
        "opens with the command that made it. After a study reruns, `python benchmarks/harness/run_all.py "
        "--refresh_studies` embeds its new report here and leaves the rest of this file as it is.",
        "",
    ]
    for report in reports:
        if report.exists():
            lines += [*embed_report(report, document), ""]
        else:
            name = Path(os.path.relpath(report, document.parent)).as_posix()
            lines += [f"`{name}`: not generated yet; `benchmarks/studies/README.md` gives its command.", ""]
    return lines


def refresh_studies(document: Path, reports: list[Path]) -> None:
    """Replace the Studies section of the existing `document` (up to the next `## ` heading) with a fresh one."""
    if not document.exists():
        raise FileNotFoundError(f"{document} does not exist: run benchmarks/harness/run_all.py to write it first.")
    lines = document.read_text(encoding="utf-8").splitlines()
    if SECTION_HEADING not in lines:
        raise ValueError(
            f"{document} has no '{SECTION_HEADING}' section: it predates embedded studies; regenerate it with "
            "benchmarks/harness/run_all.py."
        )
    start = lines.index(SECTION_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    fresh = studies_section(reports, document)
    document.write_text("\n".join([*lines[:start], *fresh, *lines[end:]]).rstrip("\n") + "\n", encoding="utf-8")
