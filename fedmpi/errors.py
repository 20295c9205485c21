"""Errors that map to the exit statuses promised in docs/interface.md."""


class FedmpiError(Exception):
    """Base class; ``exit_code`` is the process exit status the CLI uses."""

    exit_code = 1


class ConfigError(FedmpiError):
    """Bad config or command line: names the key and what is wrong (exit 2)."""

    exit_code = 2

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}")


class OutputError(FedmpiError):
    """The results file or checkpoint could not be written mid-run (disk full, directory removed):
    names the file; the run ends on every rank (exit 1), the last checkpoint left as it was."""

    exit_code = 1

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class DataError(FedmpiError):
    """Missing, truncated or malformed data file: names the path (exit 2)."""

    exit_code = 2

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DivergenceError(FedmpiError):
    """Non-finite training loss (exit 3)."""

    exit_code = 3

    def __init__(self, round_: int, client: int, loss: float):
        super().__init__(f"training diverged at round {round_}, client {client} (loss={loss})")


class PreemptedError(FedmpiError):
    """SIGTERM received: checkpoint written, run can be resumed (exit 75)."""

    exit_code = 75


def require(condition: bool, key: str, problem: str) -> None:
    """A config check: ``ConfigError(key, problem)`` unless ``condition``."""
    if not condition:
        raise ConfigError(key, problem)
