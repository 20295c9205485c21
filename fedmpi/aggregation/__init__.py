"""Aggregation rules. By default sums run in float64 in the order given (the round loop passes
client-id order), so the result does not depend on how clients were spread over ranks
(``average.py``). ``aggregation.sum: fixed_point`` sums in int64 on a per-element grid instead
(``FixedPointSum``, ``fixed_point.py``; the grid and its sums in ``quantise.py``): the same bits
whatever the order and grouping, which lets the worker ranks sum their own clients."""
from .average import average_over_holders
from .common import MISSING_POLICIES, SUM_MODES
from .fixed_point import FixedPointSum, RoundSums, fixed_point_average
from .quantise import FIXED_POINT_BITS, MAX_CONTRIBUTIONS, MAX_SUM_WEIGHT, NO_SUMMAND

__all__ = ["FIXED_POINT_BITS", "MAX_CONTRIBUTIONS", "MAX_SUM_WEIGHT", "MISSING_POLICIES", "NO_SUMMAND", "SUM_MODES",
           "FixedPointSum", "RoundSums", "average_over_holders", "fixed_point_average"]
