"""The one exception type users see: a one-line message, exit status 2."""


class QkspectraError(Exception):
    """Bad input or an unsupported request.

    The message is one line that says what is wrong and where (file, JSON
    path, layer, head). The command line prints it to stderr and exits 2.
    """
