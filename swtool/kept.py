"""The last value a slow build made (a parsed vocabulary, a tokenizer), kept by a key that names
everything it was built from: a file's sha256, the bytes of the metadata it reads."""


class KeptLast:
    """One value at a time, so a process holds one vocabulary, never a history of them. Callers share the
    value: they only read it. A build that raises keeps nothing, so a refused input is refused again."""

    def __init__(self):
        self.clear()

    def get(self, key, build):
        """The kept value if it was built from `key`, else build() (the previous value let go first)."""
        if not (self._held and self._key == key):
            self.clear()
            self._value = build()
            self._key, self._held = key, True
        return self._value

    def clear(self):
        self._key, self._value, self._held = None, None, False
