"""Fatal errors of a job, each printed by `pipeline.run` as one line:

    error: <what> (<where>): <what to do>

An expected failure (a bad flag, an --input glob that matches nothing, an --output the job cannot
write, an output directory written by another job) raises a JobError before anything runs, and
exits with 2: nothing was written, change the command and run it again. Anything else, including
a failure inside the running pipeline, exits with 1: the shards completed before it are kept, and
a rerun resumes.
"""

from __future__ import annotations

import re

USAGE_EXIT = 2  # refused before anything ran (argparse's code for usage errors too)
FAILURE_EXIT = 1  # failed while running, or unexpectedly


class JobError(Exception):
    """A failure the user can fix: what is wrong, where (a path, URL or flag), what to do."""

    exit_code = USAGE_EXIT

    def __init__(self, what: str, where: str, todo: str):
        self.what, self.where, self.todo = what, where, todo
        super().__init__(f"{what} ({where}): {todo}")

    def __reduce__(self):  # picklable, although the constructor takes three arguments
        return type(self), (self.what, self.where, self.todo)


# The last line of a Python traceback. Beam re-raises a failure inside a pipeline step as a
# RuntimeError whose text is "SomeError: message [while running 'Step']" (in process) or holds the
# worker's whole traceback (other runners); the original exception is that line.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Failure)): (.*)$", re.MULTILINE)
_STEP = re.compile(r"\s*\[while running '([^']*)'\]")


def error_line(e: BaseException) -> tuple[str, int]:
    """The one line that reports `e` (`error: ...`) and the exit code for it."""
    if isinstance(e, JobError):
        return f"error: {_flat(str(e))}", e.exit_code
    text = str(e)
    found = _EXCEPTION_LINE.findall(text)
    name, message = found[-1] if found else (type(e).__name__, text)
    while (inner := _EXCEPTION_LINE.match(message)) is not None:  # "RuntimeError: PermissionError: ..."
        name, message = inner.groups()
    step = _STEP.search(message)
    message = _flat(_STEP.sub("", message))
    if step:
        return (f"error: {name}: {message} (pipeline step {step.group(1)}): shards completed before it are kept; "
                "fix the cause and rerun the same command to resume, with --verbose for the traceback"), FAILURE_EXIT
    return f"error: {name}: {message}: unexpected; rerun with --verbose for the traceback", FAILURE_EXIT


def _flat(text: str) -> str:
    return " ".join(text.split())
