"""The engine: setup on every rank (``context``), the server's round loop (``server``), the
worker loop (``worker``), evaluation spread over the ranks (``evaluation``), typed messages
(``messages``) and checkpoints (``checkpoint``). ``run.Run`` ties them together."""
from .messages import assign_clients
from .run import Run, report_failure

__all__ = ["Run", "assign_clients", "report_failure"]
