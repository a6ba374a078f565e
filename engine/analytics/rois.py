"""Which RoIs a cohort analysis uses, and in which order.

A joined RoI (``lung`` = the five lobes) overlaps its parts, so an analysis that puts both side by
side counts the same attribution twice: in the graph's cumulative rule the joined RoI crowds out
its own parts, in a forest it is a redundant feature, in the audit an extra, dependent test. Every
analysis therefore works on one *RoI set*, chosen by name and recorded with its result:

* ``"parts"`` (default): every RoI that is not a joined RoI of parts also present;
* ``"joined"``: each joined RoI replaces its parts (the largest one wins when joined RoIs nest,
  e.g. ``lung`` over ``lung_left``);
* an explicit list of RoI names, refused when it holds a joined RoI together with one of its parts.

RoIs are ordered by class id (the model's channel order, else the paper's 17 thorax classes), then
other names alphabetically, joined RoIs last: the order the paper's notebook gives its forests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engine.errors import UserError
from engine.labels import JOINED_ROIS, THORAX_CLASSES

ROI_SETS: tuple[str, ...] = ("parts", "joined")
RoIChoice = str | Sequence[str]


class RoISetError(UserError, ValueError):
    """A RoI set that cannot be used as asked."""


def joined_definitions(config: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    """Joined RoIs known for a run: the named ones of ``engine.labels`` plus the run's own.

    ``config`` is the run's stored configuration (the job spec); its ``rois.joined`` is a list of
    names from :data:`engine.labels.JOINED_ROIS` or a mapping ``name -> parts``.
    """
    out = {k: tuple(v) for k, v in JOINED_ROIS.items()}
    joined = ((config or {}).get("rois") or {}).get("joined") if isinstance(config, Mapping) else None
    if isinstance(joined, Mapping):
        out.update({str(k): tuple(str(p) for p in v) for k, v in joined.items()})
    return out


def class_order(names: Iterable[str], *, classes: Sequence[str] | None = None,
                joined: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """``names`` sorted by class id (``classes``, else the thorax classes), others after, joined RoIs last."""
    joined = JOINED_ROIS if joined is None else joined
    order = {c: i for i, c in enumerate(classes if classes is not None else THORAX_CLASSES)}
    names = list(dict.fromkeys(names))

    def key(name: str) -> tuple[int, int, str]:
        if name in order:
            return (0, order[name], "")
        return (2 if name in joined else 1, 0, name)

    return sorted(names, key=key)


def choose_rois(
    available: Iterable[str],
    rois: RoIChoice = "parts",
    *,
    joined: Mapping[str, Sequence[str]] | None = None,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """The RoIs of ``available`` that the RoI set ``rois`` keeps, in class-id order."""
    joined = joined_definitions() if joined is None else dict(joined)
    present = list(dict.fromkeys(available))
    have = set(present)
    # Only a joined RoI whose parts are present overlaps anything here.
    live = {j: tuple(p for p in parts if p in have) for j, parts in joined.items() if j in have}
    live = {j: parts for j, parts in live.items() if parts}
    if isinstance(rois, str):
        if rois == "parts":
            keep = [r for r in present if r not in live]
        elif rois == "joined":
            accepted: dict[str, set[str]] = {}
            for j in sorted(live, key=lambda j: (-len(live[j]), j)):
                if not any(set(live[j]) & parts for parts in accepted.values()):
                    accepted[j] = set(live[j])
            covered = set().union(*accepted.values()) if accepted else set()
            keep = [r for r in present if (r in accepted) or (r not in live and r not in covered)]
        else:
            raise RoISetError(f"unknown RoI set {rois!r}; choose one of {', '.join(ROI_SETS)} or give a list of RoIs")
    else:
        asked = [str(r) for r in rois]
        unknown = [r for r in asked if r not in have]
        if unknown:
            raise RoISetError(f"RoI(s) {unknown} are not in the importances; available: {class_order(present)}")
        clash = [(j, p) for j, parts in live.items() if j in asked for p in parts if p in asked]
        if clash:
            j, p = clash[0]
            raise RoISetError(f"the RoI set holds the joined RoI {j!r} and its part {p!r}, which would count the "
                              f"same attribution twice; keep one of them (or use rois='parts' / 'joined')")
        keep = asked
    return class_order(keep, classes=classes, joined=joined)


def describe(rois: RoIChoice) -> str | list[str]:
    """How a RoI choice is recorded with a result (its name, or the explicit list)."""
    return rois if isinstance(rois, str) else [str(r) for r in rois]
