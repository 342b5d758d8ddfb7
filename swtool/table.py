"""Plain-text tables for the terminal: right-aligned numbers, left-aligned text; counted nouns."""


def plural(n, singular, plural_form=None):
    """'1 chunk', '2 chunks', '0 chunks': the count and the noun it takes (`plural_form` when not noun+s).

    Every line swtool prints with a count goes through this, so '1 chunks' cannot come back."""
    return f"{n} {plural_noun(n, singular, plural_form)}"


def plural_noun(n, singular, plural_form=None):
    """The noun alone, as plural() would choose it for `n`."""
    return singular if n == 1 else (plural_form or singular + "s")


def format_table(header, rows):
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False
