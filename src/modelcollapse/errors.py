"""The one exception type that means "the user gave us something wrong"."""


class BadInput(ValueError):
    """Bad user input (config, option, data file): the CLI prints the message as one line and exits 2."""
