"""The presence interest index against a model (Hypothesis): any sequence of
replace / drop / drop_all leaves exactly the model's interest, the fan-out's view
agrees with the sessions' view, and once every session dropped all, nothing is left."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.shell.live import LiveSession
from adapters.shell.presence_interest import PresenceInterest
from domain.session import Session, SessionConfig

SESSIONS = [LiveSession(Session(f"sid{i}", SessionConfig(), 0.0)) for i in range(3)]
SERVERS = ["s1", "s2"]
USERS = ["u1", "u2", "u3", "u4"]

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("replace"),
            st.integers(0, 2),
            st.sampled_from(SERVERS),
            st.lists(st.sampled_from(USERS), max_size=5),
        ),
        st.tuples(st.just("drop"), st.integers(0, 2), st.sampled_from(SERVERS), st.just([])),
        st.tuples(st.just("drop_all"), st.integers(0, 2), st.just(""), st.just([])),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_index_matches_the_model_and_leaves_nothing(
    steps: list[tuple[str, int, str, list[str]]],
) -> None:
    index = PresenceInterest()
    model: dict[tuple[int, str], frozenset[str]] = {}
    for kind, who, server, users in steps:
        live = SESSIONS[who]
        if kind == "replace":
            index.replace(live, server, users)
            model.pop((who, server), None)
            if users:
                model[(who, server)] = frozenset(users)
        elif kind == "drop":
            index.drop(live, server)
            model.pop((who, server), None)
        else:
            index.drop_all(live)
            model = {k: v for k, v in model.items() if k[0] != who}
        for server_id in SERVERS:
            for user_id in USERS:
                expected = {
                    SESSIONS[w] for (w, s), us in model.items() if s == server_id and user_id in us
                }
                assert set(index.interested(server_id, user_id)) == expected
        pairs = {(s, u) for (_, s), us in model.items() for u in us}
        assert index.size() == (len({w for w, _ in model}), len(pairs))
    for live in SESSIONS:
        index.drop_all(live)
    assert index.size() == (0, 0)
