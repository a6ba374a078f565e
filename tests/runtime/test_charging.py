"""Who a lost actor's patients are charged to, decided on the driver's (possibly stale) view.

No Ray cluster: the scheduler's bookkeeping is driven directly with the states a real run can
reach, including the race a real run hit in CI. A worker finished an innocent patient and began
the next one, which crashed its process before either message reached the driver. The driver
still saw the innocent patient ``computing`` and the crashing one merely sent, and had charged
the innocent one.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ObjectReconstructionFailedError, RayActorError

from engine.runtime import dispatch
from engine.runtime.dispatch import Scheduler, _Actor, _Entry


class _Writer:
    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def submit(self, pid: str, value: Any) -> None:
        self.failed[pid] = value.error


class _Watch:
    def __init__(self, reserve: dict[str, float]) -> None:
        self.nodes: list[Any] = []

    def close(self) -> None:
        pass


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scheduler]:
    import ray

    monkeypatch.setattr(dispatch, "ClusterWatch", _Watch)
    # ray.kill would start a local Ray instance in this process, which later tests would reuse.
    monkeypatch.setattr(ray, "kill", lambda handle, no_restart=True: None)
    s = Scheduler(ctx=None, actor_cls=None, actor_args=(), reserve={}, records=[], writer=_Writer(),  # type: ignore[arg-type]
                  bar=None, in_flight=2, max_attempts=2, max_workers=None, worker_timeout_s=60.0)  # type: ignore[arg-type]
    yield s
    assert not ray.is_initialized()


def _actor_with(s: Scheduler, *phases: str) -> tuple[_Actor, list[_Entry]]:
    a = _Actor(len(s.actors), handle=object(), ready_ref=object(), created_at=0.0, state="ready")
    s.actors.append(a)
    entries = []
    for i, phase in enumerate(phases):
        e = _Entry(i, {"patient_id": f"p{i}"}, phase=phase)
        gen = object()
        a.inflight[gen] = e
        s._gens[gen] = a
        entries.append(e)
    return a, entries


def _death() -> ActorDiedError:
    return ActorDiedError()  # the process died; its node is alive


def test_a_death_with_an_innocent_computing_and_the_next_patient_only_sent_charges_nobody(scheduler):
    a, (innocent, sent) = _actor_with(scheduler, "computing", "queued")
    scheduler._lost(a, _death(), "lost")
    assert scheduler.charged == 0 and innocent.attempts == sent.attempts == 0
    assert sorted(e.pid for e in scheduler.suspects) == ["p0", "p1"]  # each re-run alone
    assert not scheduler.queue and not a.inflight and a.state == "gone"


def test_a_death_with_one_patient_on_the_actor_charges_it_whatever_phase_was_heard(scheduler):
    for phase in ("queued", "loading", "loaded", "computing"):
        a, (alone,) = _actor_with(scheduler, phase)
        scheduler._lost(a, _death(), "lost")
        assert alone.attempts == 1 and alone.suspect, phase
        scheduler.suspects.clear()
    assert scheduler.charged == 4


def test_a_suspect_that_dies_alone_max_attempts_times_fails_and_says_why(scheduler):
    a, (e,) = _actor_with(scheduler, "loading")
    scheduler._lost(a, _death(), "lost")
    b = _Actor(9, handle=object(), ready_ref=object(), created_at=0.0, state="ready")
    entry = heapq.heappop(scheduler.suspects)
    b.inflight[object()] = entry
    scheduler._lost(b, _death(), "lost")
    assert scheduler.charged == 2 and not scheduler.suspects and not scheduler.queue
    assert "died 2 times" in scheduler.writer.failed["p0"]  # type: ignore[attr-defined]


def test_a_lost_node_charges_nobody_and_re_queues_at_their_place(scheduler):
    a, entries = _actor_with(scheduler, "computing", "loaded")
    scheduler._lost(a, RayActorError(), "lost")  # the connection or node, not the process
    assert scheduler.charged == 0 and not scheduler.suspects
    assert [heapq.heappop(scheduler.queue).pid for _ in range(2)] == ["p0", "p1"]
    assert all(e.losses == 1 for e in entries)


def test_a_volume_that_keeps_killing_nodes_ends_failed_after_the_loss_cap(scheduler):
    e = _Entry(0, {"patient_id": "p0"})
    for lost in range(1, 2 * scheduler.max_attempts + 2):
        a, _ = _actor_with(scheduler)
        a.inflight[object()] = e
        scheduler._lost(a, RayActorError(), "lost")
        assert e.losses == lost and (scheduler.queue == [e]) == (lost < 5)
        scheduler.queue.clear()
    assert "lost 5 times" in scheduler.writer.failed["p0"]  # type: ignore[attr-defined]
    assert scheduler.charged == 0


def test_a_timed_out_patient_is_charged_and_its_neighbour_is_not(scheduler):
    a, (stuck, neighbour) = _actor_with(scheduler, "loading", "computing")
    scheduler._lost(a, None, "killed", timed_out=[stuck])
    assert stuck.attempts == 1 and stuck.suspect and neighbour.attempts == 0 and neighbour.losses == 0
    assert [e.pid for e in scheduler.queue] == ["p1"] and [e.pid for e in scheduler.suspects] == ["p0"]


def test_suspects_drain_as_many_actors_as_they_need(scheduler):
    sent: list[tuple[int, str]] = []
    scheduler._send = lambda a, e: (sent.append((a.index, e.pid)), a.inflight.__setitem__(object(), e))  # type: ignore[method-assign]
    busy = [_actor_with(scheduler, "computing")[0] for _ in range(3)]
    for i in range(2):
        heapq.heappush(scheduler.suspects, _Entry(10 + i, {"patient_id": f"s{i}"}, suspect=True))
    heapq.heappush(scheduler.queue, _Entry(20, {"patient_id": "q"}))
    scheduler._dispatch()
    # two actors are left to run dry (one per suspect); only the third takes new work
    assert sent == [(busy[2].index, "q")]


def test_a_result_lost_with_its_node_is_re_run_not_failed(scheduler, monkeypatch):
    import ray

    a, (e,) = _actor_with(scheduler, "computing")

    class _Stream:  # what the actor's streaming call hands back: a ref whose object is gone
        def __next__(self) -> object:
            return "ref"

    stream = _Stream()
    a.inflight = {stream: e}
    scheduler._gens = {stream: a}

    def get(ref: object) -> object:
        raise ObjectReconstructionFailedError("6efb86ef")

    monkeypatch.setattr(ray, "get", get)
    scheduler._handle(stream)
    assert not scheduler.writer.failed and scheduler.charged == 0  # type: ignore[attr-defined]
    assert [x.pid for x in scheduler.queue] == ["p0"] and a.state == "gone" and not scheduler._gens
