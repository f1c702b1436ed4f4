"""Choosing a backend, and explaining the choice."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import policy
from .backends import AUTO_PRIORITY, BACKENDS, Backend
from .problem import Problem

BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


class BackendRefusedError(ValueError):
    """The requested backend cannot serve these inputs; the message lists why."""


@dataclass(frozen=True)
class Explanation:
    """Which backend runs a call, how, and why every other backend would not."""

    requested: str
    chosen: str
    path: str
    problem: Problem
    refusals: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"cross_attention({self.problem.describe()}), backend={self.requested!r}: runs {self.path}"]
        for name in BACKENDS:
            if name == self.chosen:
                continue
            reasons = self.refusals.get(name)
            if reasons:
                lines.append(f"  {name}: not used: " + "; ".join(reasons))
            elif reasons is not None:
                lines.append(f"  {name}: would also serve (lower priority)")
        return "\n".join(lines)


def _check_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def refusals(name: str, problem: Problem, auto: bool) -> list[str]:
    """Why backend `name` does not run the problem: it cannot, or (auto) policy declines it."""
    reasons = BACKENDS[name].refusals(problem)
    if auto and not reasons:
        declined = policy.auto_declines(name, problem)
        if declined:
            reasons = [declined]
    return reasons


def select(problem: Problem, backend: str) -> Backend:
    """The backend that runs `problem`; raises BackendRefusedError if an explicit one cannot.

    A backend's answer depends only on the problem (and on facts about the machine that
    cannot change while the process runs), so the choice is remembered per problem:
    repeated calls of one shape pay a dictionary lookup.
    """
    _check_name(backend)
    # Under torch.compile the choice is traced once per graph anyway (the machine facts it
    # asks are constants to Dynamo), and Dynamo would only warn about the cache.
    chosen = _select.__wrapped__(problem, backend) if torch.compiler.is_compiling() else _select(problem, backend)
    if isinstance(chosen, str):
        raise BackendRefusedError(chosen)
    return chosen


@functools.lru_cache(maxsize=4096)
def _select(problem: Problem, backend: str) -> Backend | str:
    """The backend, or the message of the refusal (a cached exception would keep its traceback)."""
    if backend != "auto":
        reasons = refusals(backend, problem, auto=False)
        if reasons:
            return f"backend={backend!r} cannot serve cross_attention({problem.describe()}): " + "; ".join(reasons)
        return BACKENDS[backend]
    for name in AUTO_PRIORITY:
        if not refusals(name, problem, auto=True):
            return BACKENDS[name]
    every = {name: refusals(name, problem, auto=True) for name in AUTO_PRIORITY}
    return f"no backend can serve cross_attention({problem.describe()}): {every}"


def explain_problem(problem: Problem, backend: str) -> Explanation:
    _check_name(backend)
    auto = backend == "auto"
    reasons = {name: refusals(name, problem, auto) for name in BACKENDS}
    if auto:
        chosen = next((name for name in AUTO_PRIORITY if not reasons[name]), "")
    else:
        chosen = backend if not reasons[backend] else ""
    path = BACKENDS[chosen].describe(problem) if chosen else "nothing (every candidate refused)"
    return Explanation(backend, chosen, path, problem, reasons)
