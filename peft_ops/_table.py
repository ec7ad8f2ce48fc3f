"""Plain-text tables for the command-line reports."""


def text_table(header: tuple, body: list[tuple]) -> str:
    """Left-aligned columns, a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
