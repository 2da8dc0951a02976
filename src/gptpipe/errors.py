class PipelineError(Exception):
    """A failure the user can act on: the message names the cause and the fix.

    Stage scripts print it without a traceback and exit non-zero.
    """
