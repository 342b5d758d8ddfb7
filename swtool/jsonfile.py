"""JSON from files swtool did not write (config.json, indexes, headers, catalogs), parsed defensively.

Python's json module accepts things a hostile or broken file can use against a reader:
  - nesting deep enough to raise RecursionError (`[[[[...` in a 100 MB header);
  - the same key twice, where json keeps the last value but other tools may keep the
    first: two readers would disagree about one file, so it is refused;
  - a file of gigabytes named config.json, read whole into memory;
  - NaN, Infinity and floats that overflow to it (1e400), which Python accepts but JSON does
    not have: an expected value of NaN would compare as "within tolerance" of nothing;
  - integers of thousands of digits (Python's int() refuses 4,300 with a ValueError).
Each of these, and every decoding error, becomes one CheckpointError naming the file.
"""

import json
import math

from swtool.errors import CheckpointError
from swtool.inputfile import open_regular

MAX_JSON_BYTES = 256 << 20  # config, index, catalog, tokenizer files are far smaller


MAX_INT_DIGITS = 100  # sizes, counts and token ids have a handful of digits; Python refuses > 4,300 anyway


class _DuplicateKey(ValueError):
    pass


class _NotPlain(ValueError):
    """A value plain JSON cannot hold: NaN, Infinity, a float that overflows, an integer of many digits."""


def _refuse_constant(name):
    raise _NotPlain(f"{name} is not a JSON value")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise _NotPlain(f"the number {text[:24]} is out of range")
    return value


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotPlain(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _no_duplicates(pairs):
    """object_pairs_hook: a dict, unless a key repeats."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def parse_json(raw, source, what=None):
    """bytes or str -> the parsed value; a CheckpointError(source, ...) for anything but plain JSON.

    `what`, if given, starts the message ("corrupt header: not valid JSON ...").
    """
    prefix = f"{what}: " if what else ""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant,
                          parse_float=_finite_float, parse_int=_bounded_int)
    except _DuplicateKey as e:
        raise CheckpointError(source, f"{prefix}key {e.args[0]!r} appears twice in one object") from None
    except _NotPlain as e:
        raise CheckpointError(source, f"{prefix}not plain JSON: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(source, f"{prefix}not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(source, f"{prefix}not valid JSON (nested too deeply)") from None


def read_limited(path, kind="JSON file", max_bytes=MAX_JSON_BYTES):
    """The bytes of the regular file at `path`, at most `max_bytes`; errors name the file and its `kind`."""
    try:
        with open_regular(path) as f:  # "no such file", FIFOs and devices: its own one-line errors
            raw = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise CheckpointError(path, f"is a directory, expected a {kind}") from None
    if len(raw) > max_bytes:
        raise CheckpointError(path, f"larger than {max_bytes >> 20} MiB, not a {kind} swtool reads")
    return raw


def read_json(path, what=None, max_bytes=MAX_JSON_BYTES):
    """Parse the JSON file at `path` (read-only, at most `max_bytes`); errors name the file."""
    return parse_json(read_limited(path, max_bytes=max_bytes), path, what)


# --- writing: strict JSON that every parser accepts -------------------------------------

def finite_or_null(value):
    """`value` with every NaN or infinite float replaced by None (null).

    Python's json writes NaN and Infinity as bare words, which are not JSON: jq, JavaScript
    and strict parsers reject the whole document. Where a number can be non-finite, a status
    field next to it says why (an audit finding's "not finite").
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value, indent=2):
    """`value` as JSON text, non-finite floats as null (see finite_or_null)."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False)
