"""Progress bars: tqdm on stderr, drawn only when stderr is a terminal.

`progress_bar(..., enabled=False)` (--no-progress) never draws; enabled, the bar is tqdm's
`disable=None`: tqdm draws it only when its stream is a terminal, so output piped or
redirected to a file, a CI log or a test's captured stderr holds no bar and no `it/s`.
tqdm is imported here only, and only when a bar is asked for.
"""

import sys


def progress_bar(iterable=None, enabled=True, **options):
    """tqdm(iterable, **options) on stderr: disabled without `enabled`, else only off a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=None if enabled else True, **options)
