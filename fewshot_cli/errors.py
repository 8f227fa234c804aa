"""The one exception type whose message reaches the user as a single sentence."""


class FewshotError(Exception):
    """A problem with the user's input or data: the CLI prints the message and exits non-zero."""
