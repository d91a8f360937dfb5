"""What the streaming engine raises besides ValueError (a request it refuses)."""


class EngineGenerateError(RuntimeError):
    """The engine failed while running this request (an internal fault); the other requests
    go on."""


class EngineDeadError(RuntimeError):
    """The engine was shut down, or its thread died: nothing more can be generated."""
