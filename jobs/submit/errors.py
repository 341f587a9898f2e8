"""The one error of ``clray submit`` and ``clray jobs``, in a module of its own so that every
part of the package (addresses, bundle, local head, client) raises the same class and the
CLI turns it into one line on stderr and exit code 2."""


class SubmitError(Exception):
    """A submission or jobs command that cannot go on; the message is meant for the user."""
