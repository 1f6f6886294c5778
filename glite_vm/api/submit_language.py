"""HTCondor's submit language: what it cannot carry, and values written so that
``condor_submit`` gives them back unchanged. Pure.

A ``$`` that would start a macro becomes ``$(DOLLAR)``; arguments and environment use the
quoted (V2) syntax; ClassAd strings need no escapes once :class:`~glite_vm.api.vmjob.VmJob`'s
validation refused quotes and backslashes. Line breaks, NUL, ``$$(`` and ``$(DOLLAR)`` cannot
be carried at all (:func:`check_submit_text`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from glite_vm.condor.jobad import v2_quote
from glite_vm.errors import RequestError

_LINE_BREAKS = ("\n", "\r", "\0")
#: A ``$`` that starts a submit-language macro or macro function (measured on condor_submit 25.0).
_MACRO_DOLLAR = re.compile(r"\$(?=[A-Za-z0-9_]*\()")
_UNWRITABLE = re.compile(r"\$\$[A-Za-z0-9_]*\(|\$\(dollar\)", re.IGNORECASE)


def check_submit_text(field: str, text: str) -> None:
    """Refuse what HTCondor's submit language cannot carry unchanged.

    A line break or NUL ends a submit line. ``$$(`` (also ``$$NAME(``) is a match-time
    reference, and the literal text ``$(DOLLAR)`` always expands, whatever the escaping.
    """
    if any(c in text for c in _LINE_BREAKS):
        raise RequestError(field, f"{text[:60]!r} contains a line break or NUL")
    if _UNWRITABLE.search(text):
        raise RequestError(
            field,
            f"{text[:60]!r} contains '$$(' or '$(DOLLAR)', which HTCondor's submit language "
            "cannot pass on unchanged",
        )


def submit_text(value: str) -> str:
    """``value`` as a submit-language value that macro expansion gives back unchanged.

    Only a ``$`` that starts a macro (``$(``, ``$ENV(``, ``$Fn(``, ...) is escaped, as
    ``$(DOLLAR)``; any other ``$`` (``$HOME``, ``$$``) is left alone by condor_submit.
    """
    return _MACRO_DOLLAR.sub("$(DOLLAR)", value)


def ad_string(value: str) -> str:
    """A ClassAd string for a ``MY.*`` command; ``value`` was validated: no quote, backslash or
    line break, so plain quoting is exact."""
    return '"' + submit_text(value) + '"'


def submit_words(words: Iterable[str]) -> str:
    """``arguments`` or ``environment`` in a submit file: the job ad's V2 syntax
    (:func:`~glite_vm.condor.jobad.v2_quote`) in double quotes, a double quote doubled
    (``"'a b' 'it''s' 'say ""hi""'"``)."""
    return '"' + v2_quote(words).replace('"', '""') + '"'
