"""Where one super weight is: the one coordinate type that scan, audit, ablate, eval and export share.

  layer   the decoder layer (0-based);
  row     the down projection's output channel: where the super activation appears (HF layout [out, in]);
  col     its input channel;
  expert  the mixture expert whose down projection holds it; None for a dense MLP or a shared expert.

Catalog entries, a GGUF's swtool.* records and the known table spell it as the same fields;
on the command line it is LAYER:ROW:COL.
"""

from dataclasses import dataclass

from swtool.errors import SwtoolError


@dataclass(frozen=True)
class Coordinate:
    layer: int
    row: int
    col: int
    expert: int | None = None

    @classmethod
    def of(cls, entry):
        """The coordinate of a dict with layer/row/col (and optionally expert) keys."""
        return cls(entry["layer"], entry["row"], entry["col"], entry.get("expert"))

    @classmethod
    def parse(cls, text, option="--zero"):
        """'L:ROW:COL' as typed on the command line; a one-line error naming `option` otherwise."""
        parts = text.split(":")
        if len(parts) != 3 or not all(p.strip().isdecimal() for p in parts):
            raise SwtoolError(f"{option} {text!r}: expected LAYER:ROW:COL, three non-negative integers like 2:507:90")
        return cls(*(int(p) for p in parts))

    @property
    def dense(self):
        """The same place without the expert: what a LAYER:ROW:COL typed by a user names."""
        return Coordinate(self.layer, self.row, self.col)

    def __str__(self):
        return f"{self.layer}:{self.row}:{self.col}" + ("" if self.expert is None else f" (expert {self.expert})")
