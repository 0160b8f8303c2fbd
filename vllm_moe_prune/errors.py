"""The one base class for errors a user can fix by changing an input.

The CLI prints these as a single line; everything else is a bug and keeps its traceback.
Each module's specific error (plan, trace, checkpoint, budget...) derives from it.
"""


class UserError(ValueError):
    """Bad input from outside: a file, a flag, a budget. The message names the problem."""
