"""``reasoning`` called directly: CONTRACTS §4 tensors for clients, the BF16 packet for a BLS
caller that asks for it, the reply channel for decode.

Why: decode asks reasoning for the single output ``delta_packet`` (any other tensor in a
decoupled BLS response crashes the decode stub in Triton 2.51, backend/serving/
reasoning_wire.py). A client that calls ``reasoning`` itself must still get the documented
tensors, and both forms must carry the same greedy tokens.
"""

from __future__ import annotations

import queue
import threading
import uuid

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from backend.serving.packet import PACKET
from backend.serving.reasoning_wire import ReasoningDelta
from backend.serving.reply_channel import REPLY_TO, Inbox
from tests.reliability_helpers import tensor

pytestmark = pytest.mark.server

BUDGET = 12


def _prompt_state(client: grpcclient.InferenceServerClient, session_id: str) -> list[grpcclient.InferInput]:
    """preprocessing -> prefill by hand: the four inputs the ensemble hands to reasoning."""
    pre = client.infer(
        "preprocessing",
        [
            tensor("text_input", "Why is the sky blue?", "BYTES"),
            tensor("max_tokens", 4, "INT32"),
            tensor("reasoning_streams", 2, "INT32"),
            tensor("reasoning_budget", BUDGET, "INT32"),
            tensor("seed", 1234, "UINT64"),  # reasoning samples, seeded
            tensor("session_id", session_id, "BYTES"),
        ],
    )
    ids, req = pre.as_numpy("input_ids"), pre.as_numpy("request_json")

    def passed_on(name: str, arr: np.ndarray, datatype: str) -> grpcclient.InferInput:
        value = arr.reshape(-1).tolist() if datatype == "BYTES" else arr
        return tensor(name, value, datatype, shape=arr.shape)

    pf = client.infer(
        "prefill", [passed_on("input_ids", ids, "INT32"), passed_on("request_json", req, "BYTES")]
    )
    return [
        passed_on("input_ids", ids, "INT32"),
        passed_on("request_json", req, "BYTES"),
        passed_on("prompt_kv", pf.as_numpy("prompt_kv"), "FP32"),
        passed_on("prompt_logits", pf.as_numpy("prompt_logits"), "FP32"),
    ]


def _stream(url: str, inputs: list[grpcclient.InferInput], outputs: list[str] | None) -> list[ReasoningDelta]:
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        client.async_stream_infer(
            "reasoning",
            inputs,
            outputs=requested,
            request_id=uuid.uuid4().hex,
            enable_empty_final_response=True,
        )
        deltas: list[ReasoningDelta] = []
        while True:
            result, error = got.get(timeout=120)
            assert error is None, error
            resp = result.get_response()
            if resp.parameters["triton_final_response"].bool_param and not resp.outputs:
                return deltas
            if outputs == [PACKET]:
                names = {o.name for o in resp.outputs}
                assert names == {PACKET}, names  # nothing the decode stub would unpack off the GIL
                raw = result.as_numpy(PACKET)
                assert raw is None or raw.dtype != np.object_
                deltas.append(ReasoningDelta.from_packet(_bf16(resp, result)))
            else:
                deltas.append(
                    ReasoningDelta(
                        stream=result.as_numpy("stream_name").reshape(-1)[0].decode(),
                        text=result.as_numpy("reasoning_output").reshape(-1)[0].decode(),
                        ids=result.as_numpy("output_ids").reshape(-1).tolist(),
                        finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                    )
                )
    finally:
        client.stop_stream()
        client.close()


def _channel(url: str, inputs: list[grpcclient.InferInput]) -> tuple[list[ReasoningDelta], int]:
    """reasoning called as decode calls it: the reply channel's parameter, the packet output
    alone. Returns the deltas the inbox got and how many responses came through Triton."""
    box = Inbox()
    objects: queue.Queue = queue.Queue()
    ended = threading.Event()
    call = box.open(objects.put, ended.set)
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer(
            "reasoning",
            inputs,
            outputs=[grpcclient.InferRequestedOutput(PACKET)],
            request_id=uuid.uuid4().hex,
            enable_empty_final_response=True,
            parameters={REPLY_TO: f"{box.address} {call}"},
        )
        through_triton = 0
        while True:
            result, error = got.get(timeout=120)
            assert error is None, error
            through_triton += 1
            resp = result.get_response()
            if resp.parameters["triton_final_response"].bool_param:
                assert not resp.outputs  # the final response carries nothing
                break
        assert ended.wait(10), "no end mark"
        deltas = [ReasoningDelta.from_object(objects.get_nowait()) for _ in range(objects.qsize())]
        return deltas, through_triton
    finally:
        client.stop_stream()
        client.close()
        box.close()


def _bf16(resp, result) -> torch.Tensor:
    """The packet's raw bytes as a BF16 tensor (tritonclient has no numpy type for BF16)."""
    idx = [o.name for o in resp.outputs].index(PACKET)
    raw = resp.raw_output_contents[idx]
    return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(1, -1)


def _by_stream(deltas: list[ReasoningDelta]) -> dict[str, tuple[str, list[int], str]]:
    out: dict[str, tuple[str, list[int], str]] = {}
    for d in deltas:
        text, ids, _ = out.get(d.stream, ("", [], ""))
        out[d.stream] = (text + d.text, ids + d.ids, d.finish_reason or "")
    return out


def test_reasoning_tensors_for_clients_packet_for_decode(triton_server) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        tensors = _by_stream(
            _stream(triton_server.grpc_url, _prompt_state(client, f"rd-{uuid.uuid4().hex}"), None)
        )
        packets = _by_stream(
            _stream(triton_server.grpc_url, _prompt_state(client, f"rd-{uuid.uuid4().hex}"), [PACKET])
        )
        channel, through_triton = _channel(
            triton_server.grpc_url, _prompt_state(client, f"rd-{uuid.uuid4().hex}")
        )
    finally:
        client.close()
    # The deadlock fix (reply_channel.py): one response through Triton, the flags-only final,
    # however many deltas the call carried.
    assert through_triton == 1 and len(channel) >= 2 * 2, (through_triton, len(channel))
    assert _by_stream(channel) == packets
    assert set(tensors) == set(packets) == {"reasoning/0", "reasoning/1"}
    for name in tensors:
        text, ids, finish = tensors[name]
        assert len(ids) == BUDGET and finish == "length", (name, tensors[name])
        assert text.strip()
        # Same prompt and seed: both transports carry the same stream token for token.
        assert packets[name] == tensors[name], (name, packets[name], tensors[name])
