"""Every value in every response is a DP release or public metadata, never a raw record.

The test sends each kind of query through the generated stub, walks every field of every
response message, and checks: no float equals a raw value of a continuous column (a raw
income appearing verbatim would be a leak), and every string is public metadata (names,
schema, domain values, labels, ids, messages), never a cell of the data.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
from google.protobuf.message import Message

from federation import Count, Histogram, Mean, Quantile, Sum, parse_filter, pki, wire
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.datasets import CREDIT_SCHEMA
from federation.local import LocalFederation
from federation.queries import Mechanism

CONTINUOUS = ("income", "debt_ratio", "loan_amount")


# Messages whose numbers are functions of the request, the config and the spend history
# only (noise scales, costs, budgets, bounds, bin edges, timestamps): public parameters.
PARAMETERS = (pb.Noise, pb.Cost, pb.BudgetStatus, pb.Receipt, pb.Column)


def walk(message: Message) -> tuple[list[float], list[str]]:
    """Float leaves outside parameter messages, and all string leaves, of a message tree."""
    floats: list[float] = []
    strings: list[str] = []
    for field, value in message.ListFields():
        if field.name == "bin_edges":
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, Message):
                f, s = walk(item)
                strings += s
                if not isinstance(item, PARAMETERS):
                    floats += f
            elif isinstance(item, float):
                floats.append(item)
            elif isinstance(item, str):
                strings.append(item)
    return floats, strings


def public_strings() -> set[str]:
    words = {"credit", "hong-kong", "shenzhen", "local-researcher", "HK", "CN", "0.1.0"}
    words.add(CREDIT_SCHEMA.description)
    for col in CREDIT_SCHEMA.columns:
        words.update((col.name, col.description))
        words.update(col.domain)
    words.update(("describe", "analyze", "train", "count", "sum", "bins", ""))
    return words


def test_responses_carry_no_raw_values(local_fed: LocalFederation, frames) -> None:
    assert local_fed.identity is not None
    where = parse_filter("age >= 30 and employment != 'student'")
    queries = [
        Count("credit", where=where, group_by="housing"),
        Sum("credit", "income", group_by="employment"),
        Mean("credit", "loan_amount", where=where),
        Mean("credit", "debt_ratio", group_by="has_mortgage"),
        Histogram("credit", "income", bins=50),
        Histogram("credit", "employment", group_by="defaulted"),
        Quantile("credit", "debt_ratio", quantiles=(0.1, 0.5, 0.9)),
    ]
    raw = np.concatenate(
        [np.asarray(f[c], dtype=np.float64) for f in frames.values() for c in CONTINUOUS]
    )
    # Records clamped to a public bound equal that bound: the bound itself is public.
    bounds = [b for c in CREDIT_SCHEMA.columns if c.has_bounds for b in (c.lower, c.upper)]
    raw = np.setdiff1d(raw, np.asarray(bounds, dtype=np.float64))
    # Noisy counts are integers, so whole-number records cannot be told apart from them;
    # the fractional ones can, and none may appear.
    raw = raw[raw != np.round(raw)]
    assert raw.size > 50_000  # distinct sensitive values checked
    allowed = public_strings()
    for node, proc in local_fed.processes.items():
        channel = grpc.secure_channel(
            proc.address,
            pki.channel_credentials(local_fed.identity),
            options=[("grpc.ssl_target_name_override", node)],
        )
        with channel:
            stub = pb_grpc.NodeStub(channel)
            responses: list[Message] = [stub.Describe(pb.DescribeRequest(), timeout=10)]
            for query in queries:
                for mechanism, delta in ((Mechanism.LAPLACE, 0.0), (Mechanism.GAUSSIAN, 1e-8)):
                    request = wire.AnalyzeRequest(
                        query=query, epsilon=1.0, delta=delta, mechanism=mechanism
                    )
                    responses.append(
                        stub.Analyze(wire.analyze_request_to_proto(request), timeout=30)
                    )
        for response in responses:
            floats, strings = walk(response)
            leaked = np.intersect1d(np.asarray(floats, dtype=np.float64), raw)
            assert leaked.size == 0, f"raw values in a {type(response).__name__}: {leaked[:5]}"
            for text in strings:
                # Bin labels: "[a, b)", the last bin "[a, b]".
                is_label = re.fullmatch(r"\[[-0-9.e+]+, [-0-9.e+]+[)\]]", text) is not None
                # ids and key ids (32 hex), receipt digests (SHA-256, 64 hex)
                is_id = re.fullmatch(r"[0-9a-f]{32}|[0-9a-f]{64}", text) is not None
                assert text in allowed or is_label or is_id, f"unexpected string {text!r}"
