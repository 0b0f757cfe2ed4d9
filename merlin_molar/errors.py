"""The project's error type: every bad-input error names the file (or object) and the problem."""


class MolarDataError(ValueError):
    """Raised for unusable input data: missing files or columns, empty tables, bad values, unknown ids."""

    def __init__(self, source, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def check_choice(option: str, value, allowed) -> None:
    """A string option must be one of ``allowed``; the message lists them."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {sorted(allowed)}, got {value!r}")
