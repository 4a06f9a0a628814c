"""
The sections of BENCHMARKS.md that embed reports made by other commands: the studies of benchmarks/studies/, the
RL benchmark of benchmarks/rl/ and the user store and server figures of benchmarks/performance/, each report as it
stands.

A study or an RL run answers its own question with its own command (the first lines of its report name it) and is
rerun on its own schedule; `run_all.py` embeds the reports its plan lists when it writes BENCHMARKS.md, and
`run_all.py --refresh_reports` re-embeds them into the existing file after one reruns, leaving the rest of it as it
was. Headings move two levels down and relative links are rewritten to resolve from BENCHMARKS.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#+) ")
REFRESH_COMMAND = "python -m benchmarks.harness.run_all --refresh_reports"


@dataclass(frozen=True)
class EmbeddedSection:
    """A `## ` section of embedded reports: its heading, the sentence that opens it, the README with the commands."""

    heading: str
    intro: str
    readme: str


STUDIES = EmbeddedSection(
    heading="## Studies",
    intro="Studies of one question each, embedded from their reports under `benchmarks/studies/results/`; each report "
    f"opens with the command that made it. After a study reruns, `{REFRESH_COMMAND}` embeds its new report here and "
    "leaves the rest of this file as it is.",
    readme="benchmarks/studies/README.md",
)
RL = EmbeddedSection(
    heading="## Policies trained against the rewards (RL)",
    intro="GRPO policies trained against MiCRo, SingleReward and each context's gold reward, judged by the gold, "
    "embedded from their reports under `benchmarks/rl/results/`; each report opens with the command that made it. "
    f"After an RL run, `{REFRESH_COMMAND}` embeds its new report here and leaves the rest of this file as it is.",
    readme="benchmarks/rl/README.md",
)
SERVICE = EmbeddedSection(
    heading="## Serving many users: the user store and the server",
    intro="The per-user store and the reward server at production scale, embedded from their reports under "
    "`benchmarks/performance/results/`; each report opens with the command that made it. After one reruns, "
    f"`{REFRESH_COMMAND}` embeds its new report here and leaves the rest of this file as it is.",
    readme="benchmarks/performance/README.md",
)


def _relink(line: str, report: Path, document: Path) -> str:
    def rewrite(match: re.Match) -> str:
        target = match.group(1)
        if re.match(r"^([a-z]+:|#|/)", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        moved = Path(os.path.relpath(report.parent / path, document.parent)).as_posix()
        return f"]({moved}{'#' + anchor if anchor else ''})"

    return _LINK.sub(rewrite, line)


def _outside_fences(lines: list[str], rewrite) -> list[str]:
    """`lines` with `rewrite` applied to each line outside code fences."""
    rewritten, fenced = [], False
    for line in lines:
        fenced ^= line.startswith("```")
        rewritten.append(line if fenced else rewrite(line))
    return rewritten


def _demote(line: str, levels: int = 2) -> str:
    return _HEADING.sub(lambda match: "#" * (len(match.group(1)) + levels) + " ", line)


def demote_headings(lines: list[str]) -> list[str]:
    """`lines` with every Markdown heading outside code fences two levels down."""
    return _outside_fences(lines, _demote)


def embed_report(report: Path, document: Path) -> list[str]:
    """`report`'s lines as a subsection of `document`: headings two levels down, relative links rewritten."""
    lines = report.read_text(encoding="utf-8").splitlines()
    return _outside_fences(lines, lambda line: _relink(_demote(line), report, document))


def embedded_section(section: EmbeddedSection, reports: list[Path], document: Path) -> list[str]:
    """The section: its introduction, then each report in `reports` (or a note naming a report not written yet)."""
    lines = [section.heading, "", section.intro, ""]
    for report in reports:
        if report.exists():
            lines += [*embed_report(report, document), ""]
        else:
            name = Path(os.path.relpath(report, document.parent)).as_posix()
            lines += [f"`{name}`: not generated yet; `{section.readme}` gives its command.", ""]
    return lines


def _section_end(lines: list[str], start: int) -> int:
    return next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))


def refresh_section(
    document: Path, section: EmbeddedSection, reports: list[Path], after: EmbeddedSection | None = None
) -> None:
    """
    Replace `section` of the existing `document` (up to the next `## ` heading) with a fresh one; a document without
    it gets it right after the section `after`, when given and present.
    """
    if not document.exists():
        raise FileNotFoundError(
            f"{document} does not exist: run `python -m benchmarks.harness.run_all` to write it first."
        )
    lines = document.read_text(encoding="utf-8").splitlines()
    fresh = embedded_section(section, reports, document)
    if section.heading in lines:
        start = lines.index(section.heading)
        end = _section_end(lines, start)
    elif after is not None and after.heading in lines:
        start = end = _section_end(lines, lines.index(after.heading))
    else:
        raise ValueError(
            f"{document} has no '{section.heading}' section: it predates this section; regenerate it with "
            "`python -m benchmarks.harness.run_all`."
        )
    document.write_text("\n".join([*lines[:start], *fresh, *lines[end:]]).rstrip("\n") + "\n", encoding="utf-8")
