"""One exception type for every user-fixable problem.

The CLI turns a :class:`SavltError` into a single line on stderr and exit code 2, so a
misconfigured run never ends in a traceback or, worse, a silently wrong result.
"""


class SavltError(Exception):
    """A problem the user can fix: the message names the file or key and the fix."""
