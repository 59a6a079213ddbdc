"""The one exception type that means "the user gave us something wrong"."""


class BadInput(ValueError):
    """Bad user input (config, option, data file): the CLI prints the message as one line and exits 2."""


class RunFailed(RuntimeError):
    """A run stopped for a reason it can say in one line (e.g. a chain's metrics came out non-finite): the CLI
    prints it and exits 1; the run is marked failed and resumes like any other."""
