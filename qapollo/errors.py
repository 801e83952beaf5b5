"""The one base class of every error a user can cause and fix (a bad config, data, checkpoint, argument).

The command line catches `QapolloError` once and prints its message as one `error:` line (cli.py); any
other exception is a bug and keeps its traceback. Each module defines its own subclasses next to the code
that raises them; each also derives from the builtin type callers caught before (ValueError, RuntimeError).
"""


class QapolloError(Exception):
    """A problem with what the user gave; the message says what is wrong and what to do."""


class EvalError(QapolloError, ValueError):
    """Bad `qapollo eval` / `qapollo generate` arguments (shared by inference.py, evaluate.py, harness.py and
    generate.py); the message says what to change."""
