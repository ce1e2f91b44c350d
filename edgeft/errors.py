"""The one kind of error the user is shown: a mistake they can fix, said in a sentence.

Every module's own error (ConfigError, DataError, ModelLoadError, ...) derives from
:class:`UserError`, and the CLI catches that one class: the message is printed as it is, never
a traceback. Anything else that escapes is a bug in edgeft.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what and how.

    One line, unless the class sets ``multiline`` (a data report lists one problem a line, a
    source error one line per source tried)."""

    multiline = False
