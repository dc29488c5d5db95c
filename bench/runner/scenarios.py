"""The runner benchmark's scenarios: the chains, their configs, and the frames of one call.

Everything here is built before the clock starts: each scenario's PrepareConf, its HTTPReqCall
frames, the answers APISIX gives to the runner's questions, and the checks of each reply.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from deepgate.route_signature import HEADER as ROUTE_HEADER
from plugins.runner import codec
from plugins.runner.codec import Method, MsgType

REPO = Path(__file__).resolve().parents[2]

TARGET_P50_MS = 0.5
TARGET_P99_MS = 2.0
TARGET_CALLS_PER_CPU_S = 5000.0

PROMPT_FILTER = "deepgate-prompt-filter"
PROMPT_FILTER_CONF = {
    "max_prompt_tokens": 4000,
    "max_body_bytes": 1_000_000,
    "deny_patterns": [
        "(?i)ignore (all )?previous instructions",
        "(?i)disregard (the|your) (system prompt|instructions)",
        {"name": "jailbreak-dan", "pattern": "(?i)\\byou are now DAN\\b"},
        {"name": "prompt-leak", "pattern": "(?i)(print|reveal|repeat) your system prompt"},
    ],
}

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "max_tokens": 512,
    "user": "customer-1842",
    "messages": [
        {
            "role": "system",
            "content": (
                "You are the support assistant of an outdoor equipment shop. Answer questions "
                "about orders, shipping, returns and billing. Be concise and friendly, name the "
                "policy section you rely on when there is one, and ask one clarifying question "
                "when the customer's request is ambiguous. Returns are accepted within 30 days "
                "for unused items (policy 4.2); worn footwear can be returned within 14 days if "
                "it is faulty (policy 4.5). Standard shipping takes 3 to 5 working days, express "
                "shipping 1 to 2 working days (policy 2.1)."
            ),
        },
        {
            "role": "user",
            "content": (
                "Hi, I ordered a pair of hiking boots (order 48213-B) on the 3rd and the "
                "tracking page has said 'label created' for five days now. I paid for express "
                "shipping because I leave for a trip on Saturday. Can you tell me what is going "
                "on, and whether I can still get them in time?"
            ),
        },
        {
            "role": "assistant",
            "content": (
                "I'm sorry for the wait. Order 48213-B was packed on the 4th, but the carrier "
                "has not scanned the parcel yet, which is why tracking still shows 'label "
                "created'. Express shipping should take 1 to 2 working days (policy 2.1), so "
                "this is late. I can ask the warehouse to hand it to the carrier again today, "
                "or send a replacement pair by express courier. Which would you prefer?"
            ),
        },
        {
            "role": "user",
            "content": (
                "Please send the replacement by courier, same size (EU 43) and colour (slate "
                "grey). If the first parcel turns up later, I will send it back unopened. Will "
                "I be refunded the express shipping fee since it did not arrive on time? And "
                "could you confirm the delivery address is still 12 Harbour Lane, Flat 3? "
                "Thanks a lot for the quick help, the trip is a week in the Alps and I really "
                "need boots that are already broken in, so if the replacement cannot arrive by "
                "Friday evening, tell me now and I will buy a pair locally instead."
            ),
        },
    ],
}

HEADERS: list[tuple[str, str | None]] = [
    ("host", "127.0.0.1:9080"),
    ("user-agent", "OpenAI/Python 1.54.4"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-bench-0123456789abcdef0123456789abcdef"),
    ("x-stainless-lang", "python"),
    ("x-stainless-retry-count", "0"),
]


# After key-auth (ext-plugin-post-req): deepgate-auth-bridge moved the key into ``apikey`` and
# key-auth's hide_credentials removed it, so no credential header reaches the post-req chain.
POST_REQ_HEADERS = [h for h in HEADERS if h[0] != "authorization"]

# --- the full chain, from the shipped route config ---------------------------------------------

SHIPPED_ROUTES = REPO / "apisix-conf" / "apisix.yaml"
CHAT_ROUTE = "chat-completions"
FULL_CHAIN = ("deepgate-policy", "deepgate-prompt-filter", "deepgate-safety", "deepgate-router")
BENCH_CONSUMER = "demo"  # the shipped consumer; APISIX's consumer_name after key-auth
BENCH_ROUTE_KEY = "bench-route-key-0123456789abcdef"  # DEEPGATE_ROUTE_KEY for the runner
# Limits no bench can reach: the counters, the Lua script and the headers stay the same.
BENCH_QUOTA = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "tokens_per_day": 10**13,
    "spend_per_month_usd": 10**6,
}
# The same chat, asking for the shipped router's headline alias (clients name an alias).
FULL_CHAIN_BODY = {**CHAT_BODY, "model": "auto"}

SCENARIOS = ("empty", "prompt-filter", "full-chain")


class BenchError(Exception):
    """The runner answered wrongly, or went away."""


def _bench_policy(value: dict[str, Any]) -> dict[str, Any]:
    """The shipped policy with every quota limit it sets raised past what a bench can use."""
    value = orjson.loads(orjson.dumps(value))  # a deep copy
    rules = [*value.get("consumers", {}).values(), value.get("default") or {}]
    for rule in rules:
        quota = rule.get("quota")
        if quota:
            for name in quota:
                quota[name] = BENCH_QUOTA[name]
    if BENCH_CONSUMER not in value.get("consumers", {}):
        raise BenchError(f"the shipped deepgate-policy has no consumer {BENCH_CONSUMER!r}")
    return value


def _without_sidecar(value: dict[str, Any]) -> dict[str, Any]:
    """The shipped safety config less the detectors that ask the sidecar (classifier, topics)."""
    value = orjson.loads(orjson.dumps(value))
    value.pop("topics", None)
    if isinstance(value.get("injection"), dict):
        value["injection"].pop("classifier", None)
    return value


def full_chain_conf(path: Path = SHIPPED_ROUTES) -> list[tuple[str, str]]:
    """The chat-completions route's post-req chain, as the bench runs it (see the docstring)."""
    routes = yaml.safe_load(path.read_text())["routes"]
    route = next((r for r in routes if r.get("id") == CHAT_ROUTE), None)
    if route is None:
        raise BenchError(f"{path}: no route {CHAT_ROUTE!r}")
    conf: list[tuple[str, str]] = []
    for entry in route["plugins"]["ext-plugin-post-req"]["conf"]:
        name = entry["name"]
        if name not in FULL_CHAIN:
            continue  # deepgate-cache: its semantic lookup is a gRPC call to the sidecar
        value = orjson.loads(entry["value"])
        if name == "deepgate-policy":
            value = _bench_policy(value)
        elif name == "deepgate-safety":
            value = _without_sidecar(value)
        conf.append((name, orjson.dumps(value).decode()))
    if tuple(name for name, _ in conf) != FULL_CHAIN:
        raise BenchError(f"{path}: route {CHAT_ROUTE!r} does not run {' -> '.join(FULL_CHAIN)}")
    return conf


# --- frames, encoded before the clock starts ----------------------------------------------------

REQ_BODY_QUESTION = codec.frame(
    MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.ReqBody())
)
NO_VALUE_ANSWER = codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(None))


def var_question(name: str) -> bytes:
    return codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.Var(name)))


@dataclass(slots=True)
class Scenario:
    """One chain. ``vars``: the APISIX variables the client answers (others: no value);
    ``questions``: the ExtraInfo questions every call must ask (the body counted);
    ``rewrite``: every call must end in a Rewrite carrying a signed route, else "no action"."""

    name: str
    conf: list[tuple[str, str]]
    body: bytes
    asks_body: bool
    vars: dict[str, str] | None = None
    questions: int = -1  # -1: the body question only, when asks_body
    rewrite: bool = False
    route: str = ""  # the route id in the PrepareConf key
    headers: list[tuple[str, str | None]] | None = None
    token: int = 0
    var_answers: dict[bytes, bytes] | None = None  # question frame -> answer frame

    def __post_init__(self) -> None:
        if self.questions < 0:
            self.questions = int(self.asks_body)
        self.route = self.route or f"bench-{self.name}"
        self.var_answers = {
            var_question(name): codec.frame(
                MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(value.encode())
            )
            for name, value in (self.vars or {}).items()
        }

    def var_value(self, name: str) -> bytes | None:
        value = (self.vars or {}).get(name)
        return None if value is None else value.encode()


_ids = itertools.count(1)


@dataclass(slots=True)
class Calls:
    """Pre-encoded HTTPReqCall frames, the exact "no action" reply expected for each, and the
    body each call's APISIX answers with (its own last message: see ``call_body``)."""

    requests: list[bytes]
    replies: list[bytes]
    ids: list[int]
    bodies: list[bytes]


# A reference in letters: digits would look like a phone number to the personal-data detector
# (and send every call through Presidio), vowels could spell a rule's anchor word.
_TICKET_LETTERS = "bcdfhjkmnpqrstvwxz"


def ticket(call_id: int) -> str:
    letters = []
    while True:
        call_id, rest = divmod(call_id, len(_TICKET_LETTERS))
        letters.append(_TICKET_LETTERS[rest])
        if not call_id:
            return " (ref " + "".join(reversed(letters)) + ")"


def call_body(body: bytes, call_id: int) -> bytes:
    """``body`` with the call's own ticket number at the end of its last message: no two calls
    send the same prompt. In chat traffic the system prompt and the history repeat on every
    turn and the newest message is new; this makes the bench's calls look like that, so a
    runner that remembers what it saw pays for each call's new text as it would in service."""
    value = orjson.loads(body)
    last = value["messages"][-1]
    last["content"] = last["content"] + ticket(call_id)
    return codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(orjson.dumps(value)))


def encode_calls(scenario: Scenario, n: int) -> Calls:
    requests, replies, ids, bodies = [], [], [], []
    headers = [*(scenario.headers or HEADERS), ("content-length", str(len(scenario.body)))]
    for _ in range(n):
        call_id = next(_ids) & 0xFFFFFFFF
        req = codec.HTTPReqCallReq(
            id=call_id,
            conf_token=scenario.token,
            method=Method.POST,
            path="/v1/chat/completions",
            src_ip=bytes((127, 0, 0, 1)),
            headers=[*headers, ("x-request-id", f"bench-{call_id:010d}")],
        )
        requests.append(codec.frame(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(req)))
        reply = codec.encode_http_req_call_resp(codec.HTTPReqCallResp(id=call_id))
        replies.append(codec.frame(MsgType.RPC_HTTP_REQ_CALL, reply))
        ids.append(call_id)
        if scenario.asks_body:
            bodies.append(call_body(scenario.body, call_id))
    return Calls(requests, replies, ids, bodies)


def check_final(frame: bytes, expected: bytes, call_id: int, rewrite: bool = False) -> None:
    """Fail unless ``frame`` is the "no action" reply to ``call_id`` (bytes compared first), or
    with ``rewrite`` a Rewrite carrying a signed route (checked in full on one call by
    ``prepare_and_check``; here its presence and shape)."""
    if rewrite:
        check_rewrite(frame, call_id)
        return
    if frame == expected:
        return
    resp = _call_reply(frame, call_id)
    if resp.id != call_id or resp.action is not None:
        raise BenchError(f"call {call_id}: expected no action, got id {resp.id}: {resp.action!r}")


def _call_reply(frame: bytes, call_id: int) -> codec.HTTPReqCallResp:
    """The HTTPReqCall reply in ``frame``; an error or another frame type fails the call."""
    msg_type = frame[0]
    if msg_type == MsgType.RPC_ERROR:
        code = codec.decode_err_resp(frame[4:]).code
        raise BenchError(f"call {call_id}: the runner answered RPC_ERROR {code.name}")
    if msg_type != MsgType.RPC_HTTP_REQ_CALL:
        raise BenchError(f"call {call_id}: reply of frame type {msg_type}")
    return codec.decode_http_req_call_resp(frame[4:])


def check_rewrite(frame: bytes, call_id: int) -> codec.Rewrite:
    resp = _call_reply(frame, call_id)
    action = resp.action
    if resp.id != call_id or not isinstance(action, codec.Rewrite):
        detail = (
            f"Stop {action.status}: {action.body[:300]!r}"
            if isinstance(action, codec.Stop)
            else repr(action)
        )
        raise BenchError(f"call {call_id}: expected a Rewrite, got id {resp.id}: {detail}")
    for name, value in action.headers:
        if name == ROUTE_HEADER and value and ";sig=" in value:
            return action
    raise BenchError(f"call {call_id}: the Rewrite carries no signed {ROUTE_HEADER}")


def answer_question(frame: bytes, scenario: Scenario, body: bytes) -> tuple[bytes, bool]:
    """(the answer frame, whether the body was asked) for an ExtraInfo question; ``body`` is
    the call's body answer."""
    if frame == REQ_BODY_QUESTION:
        return body, True
    answers = scenario.var_answers
    if answers:
        found = answers.get(frame)
        if found is not None:
            return found, False
    info = codec.decode_extra_info_req(frame[4:]).info
    if isinstance(info, codec.ReqBody):
        return body, True
    if isinstance(info, codec.Var):
        return NO_VALUE_ANSWER, False
    raise BenchError(f"the runner asked for {info!r} in a request call")


def frame_size(buf: bytes) -> int:
    """Total size of the frame at the start of ``buf``, or -1 while its header is incomplete."""
    if len(buf) < 4:
        return -1
    return 4 + (buf[1] << 16 | buf[2] << 8 | buf[3])
