"""The report summary read from markdown-it's token stream: what structure changes, and hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nightcrier as nc

CASES = {
    "setext heading": ("Root Cause\n----------\n\nThe node ran out of disk.\n\nConfidence: low\n",
                       "The node ran out of disk.", "LOW"),
    "tilde fence hides a heading": ("~~~\n## Root Cause\nfake\n~~~\n\n## Root Cause\nReal cause.\n",
                                    "Real cause.", "UNKNOWN"),
    "indented code hides a key": ("# R\n\n    **Root cause:** not this. Confidence: high\n\n"
                                  "**Root cause:** this one. Confidence: medium\n", "this one.", "MEDIUM"),
    "inside a blockquote": ("> ## Root Cause\n> The quota is exhausted.\n> **Confidence:** High\n",
                            "The quota is exhausted.", "HIGH"),
    "task list item": ("## Root Cause\n\n- [x] The HPA max is 1.\n- [ ] Other\n",
                       "The HPA max is 1.", "UNKNOWN"),
    "link and image text": ("## Root Cause\nSee [the quota](https://x.example/q) and ![graph](g.png).\n",
                            "See the quota and graph.",
                            "UNKNOWN"),
    "vertical table with bold keys": (
        "| **Root Cause** | Bad probe |\n|---|---|\n| **Confidence** | high |\n", "Bad probe", "HIGH"),
    "pipe lines without a delimiter row": ("# R\n\n| Root Cause | Wrong port |\n| Confidence | low |\n",
                                           "Wrong port", "LOW"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structure_the_lines_could_not_see(name: str) -> None:
    markdown, root_cause, confidence = CASES[name]
    summary = nc.summarize_report(markdown)
    assert (summary.root_cause, summary.confidence) == (root_cause, confidence)


MARKDOWN_PIECES = st.sampled_from([
    "# ", "## ", "### ", "Root Cause", "root-causes", "H1: ", "H2", "**", "__", "*", "_", "`", "```", "~~~",
    "| ", " |", "|---|", "\n", "\n\n", "- ", "1. ", "> ", "Confidence", ": ", "HIGH", "low", "medium", "FLOW",
    "Statement:", "Primary Hypothesis", "[", "](", ")", "![", "<script>", "&amp;", "\\", "    ", "---", "=",
    "word ", "é", "\t", "\r",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(MARKDOWN_PIECES, st.text(max_size=20)), max_size=60).map("".join))
def test_any_text_gives_a_summary(markdown: str) -> None:
    summary = nc.summarize_report(markdown)
    assert summary.confidence in ("HIGH", "MEDIUM", "LOW", "UNKNOWN")
    assert 0 < len(summary.root_cause) <= nc.ROOT_CAUSE_MAX_CHARS
    assert "\n" not in summary.root_cause


def test_huge_lines_are_cut_before_parsing() -> None:
    line = "*a " * (nc.SUMMARY_MAX_CHARS // 4)
    summary = nc.summarize_report(f"## Root Cause\n{line}\n**Confidence:** low\n")
    assert summary.confidence == "LOW" and len(summary.root_cause) <= nc.ROOT_CAUSE_MAX_CHARS


def test_only_the_head_of_a_huge_report_is_read() -> None:
    head = "## Root Cause\nThe cache is cold.\n**Confidence:** medium\n\n"
    filler = "Lorem ipsum dolor sit amet.\n\n" * (nc.SUMMARY_MAX_CHARS // 20)
    assert nc.summarize_report(head + filler).text == "The cache is cold. (confidence: MEDIUM)"
    assert nc.summarize_report(filler + head).text == "See investigation report (confidence: UNKNOWN)"
