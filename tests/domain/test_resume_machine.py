"""Stateful test of the session's resume rows (PROTOCOL section 13) against a model.

The model is written from PROTOCOL section 13, not from :mod:`domain.resume`: which
endings park, what a session keeps (the last B dispatches sent, plus everything since
the drop up to the outbound bound, the oldest sent ones giving way first), which
``seq`` a RESUME may name, and what it gets back. Hypothesis drives dispatches, frames
lost in flight, drops with every kind of close, parked dispatches, the TTL, resumes
(right, stale and future ``seq``) and zombie takeovers. The client's view is checked
all along: across every resume it sees each dispatch once, in order, with no gap.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domain.codec import dispatch_template
from domain.effects import Dropped, Reattach, Send, TimerFired
from domain.model import Server, Status, User
from domain.session import Session, SessionConfig, State

BUFFER = 3
MAX_FRAMES = 6
TTL = 10.0
CONFIG = SessionConfig(
    resume_ttl=TTL, resume_buffer_frames=BUFFER, replay_max_frames=MAX_FRAMES,
    replay_max_bytes=1 << 30, rate_limit_count=10_000, heartbeat_timeout=1e9,
)
USER = User(id="u1", username="alice", display_name="Alice", avatar_url=None)

#: (close code, closed by the client) -> parks, as section 13 lists them.
ENDINGS = {
    (None, True): True, (1006, True): True, (1005, True): True, (4100, True): True,
    (1000, True): False, (1001, True): False,
    (1001, False): True, (1009, False): True, (4008, False): True, (4009, False): True,
    (4010, False): False, (4014, False): False, (4000, False): False,
}


class ResumeMachine(RuleBasedStateMachine):
    @initialize()
    def ready(self) -> None:
        self.now = 0.0
        self.session = Session("sid", CONFIG, 0.0)
        self.session.state = State.IDENTIFYING
        self.session.user_id = USER.id
        (ready,) = self.session.identified(USER, [Server("s1", "Home", "u1", None)], Status.DND)
        #: Model: every dispatch the session produced, by s (s - 1 is the index).
        self.produced: list[str] = ["READY"]
        self.state = "attached"
        self.parked_from = 0  # first s produced while parked
        self.parked_at = 0.0
        #: What the client saw, in order (dispatch ops); it saw READY.
        self.seen: list[tuple[int, str]] = []
        self.receive([ready])
        self.in_flight: list[Send] = []  # sent but not yet read by the client
        self.events = 0

    def receive(self, effects: list[object]) -> None:
        for effect in effects:
            assert isinstance(effect, Send)
            doc = json.loads(effect.text)
            self.seen.append((doc["s"], doc["op"]))

    def kept(self) -> list[int]:
        """The s a resume may replay, as section 13 says."""
        last = len(self.produced)
        if self.state == "attached":
            return list(range(max(1, last - BUFFER + 1), last + 1))
        since = list(range(self.parked_from, last + 1))
        before = list(range(max(1, self.parked_from - BUFFER), self.parked_from))
        room = MAX_FRAMES - len(since)
        return (before[max(0, len(before) - room) :] if room > 0 else []) + since

    # --- rules ------------------------------------------------------------------

    @precondition(lambda self: self.state == "attached")
    @rule(lost=st.booleans())
    def dispatch(self, lost: bool) -> None:
        self.events += 1
        op = f"E{self.events}"
        frame = self.session.stamp(dispatch_template(op, {"n": self.events}))
        self.produced.append(op)
        if not lost:  # a frame lost in flight never reaches the client
            self.receive([Send(frame)])

    @precondition(lambda self: self.state == "parked")
    @rule()
    def dispatch_while_parked(self) -> None:
        self.events += 1
        op = f"E{self.events}"
        kept = self.session.keep(dispatch_template(op, {"n": self.events}))
        self.produced.append(op)
        over = len(self.produced) - self.parked_from + 1 > MAX_FRAMES
        assert kept is not over
        if over:
            self.state = "ended"

    @precondition(lambda self: self.state == "attached")
    @rule(ending=st.sampled_from(sorted(ENDINGS, key=str)))
    def drop(self, ending: tuple[int | None, bool]) -> None:
        code, by_client = ending
        self.session.close(code or 1006, "gone")
        assert self.session.report(Dropped(code, by_client, self.now)) == []
        if ENDINGS[ending]:
            self.state, self.parked_at = "parked", self.now
            self.parked_from = len(self.produced) + 1
            assert self.session.state is State.PARKED
        else:
            self.state = "ended"
            assert self.session.state is State.CLOSED

    @rule(dt=st.sampled_from([1.0, 4.0, 9.5]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.session.report(TimerFired(self.now), self.now)
        if self.state == "parked" and self.now >= self.parked_at + TTL:
            self.state = "ended"
        assert (self.session.state is State.CLOSED) is (self.state == "ended")

    @precondition(lambda self: self.state in ("attached", "parked"))
    @rule(back=st.integers(min_value=-2, max_value=8))
    def resume(self, back: int) -> None:
        """A RESUME (of a parked session, or a zombie's takeover) from ``seq``: the
        client's last s, ``back`` earlier (lost frames it asks again) or in the future."""
        seq = max(0, self.seen[-1][0] - back)
        last = len(self.produced)
        kept = self.kept()
        allowed = seq <= last and (seq == last or (bool(kept) and kept[0] <= seq + 1))
        assert self.session.can_resume(seq) is allowed
        if not allowed:
            return
        effects = self.session.report(Reattach(seq, self.now))
        self.seen = [item for item in self.seen if item[0] <= seq]
        self.receive(list(effects))
        *frames, resumed = [json.loads(e.text) for e in effects if isinstance(e, Send)]
        assert [f["op"] for f in frames] == self.produced[seq:]
        assert resumed["op"] == "RESUMED" and resumed["d"]["replayed"] == last - seq
        self.produced.append("RESUMED")
        self.state = "attached"
        assert self.session.state is State.READY

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def the_client_saw_a_gapless_prefix(self) -> None:
        # After lost frames the client has a gap only until it resumes; what it saw
        # since its last resume is exactly the produced dispatches, once, in order.
        seqs = [s for s, _ in self.seen]
        assert seqs == sorted(set(seqs))
        for s, op in self.seen:
            assert self.produced[s - 1] == op

    @invariant()
    def s_counts_every_dispatch(self) -> None:
        assert self.session.seq == len(self.produced)


TestResumeMachine = ResumeMachine.TestCase
TestResumeMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
