"""The one error base of the dyve tools: bad input or a failed step, with a message for
the user. Each tool's error (TuneError, BenchError, DataError, ...) derives from it, so a
command-line front end prints it as one line instead of a traceback."""


class DyveError(RuntimeError):
    """Bad input or a failed step, with a message that names the file, layer or field."""


class InputError(DyveError):
    """A prototxt, caffemodel, mean or image set that cannot be used as given."""


class BenchError(DyveError):
    """A failed benchmark step (dyve.bench, dyve.timing, dyve.report)."""
