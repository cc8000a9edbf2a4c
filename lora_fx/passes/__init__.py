"""Graph passes: plain functions ``(graph, ctx) -> list[Record]`` on fresh copies of captured graphs, run as
pipelines by ``derive``; ``fold`` is the merge: the same state folded into the base weights."""

from .derive import Derived, build, install
from .pipeline import Action, GraphContext, Record, run_pipeline
from .plan import Ref, RewritePlan, RoutedBranch, UnitBranch

__all__ = ["Derived", "build", "install", "Action", "GraphContext", "Record", "run_pipeline", "Ref", "RewritePlan",
           "RoutedBranch", "UnitBranch"]
