"""The one exception type whose message is shown to the user as it is."""


class AslprepError(Exception):
    """A problem with the input or the environment that the user can fix.

    The message is a single line that names the file and the field (or condition)
    and says what to do. The command line prints it without a traceback.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)
