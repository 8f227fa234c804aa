"""The exceptions whose message reaches the user as a single sentence. Ground floor."""


class FewshotError(Exception):
    """A problem with the user's input or data: the CLI prints the message and exits non-zero."""


class Interrupted(FewshotError):
    """Training stopped by Ctrl-C after saving ``last.pt`` (exit status 130)."""
