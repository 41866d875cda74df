"""Decoupled model that calls another decoupled model through BLS on a background thread.

The fast stream never waits on the slow one: both threads send on the same
response sender (under a lock); the final flag goes out after both end.
"""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _resp(text, stream):
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("TEXT_OUT", np.array([[text.encode()]], dtype=object)),
            pb_utils.Tensor("STREAM", np.array([[stream.encode()]], dtype=object)),
        ]
    )


class TritonPythonModel:
    def execute(self, requests):
        for req in requests:
            threading.Thread(target=self._run, args=(req,), daemon=True).start()
        return None

    def _run(self, req):
        sender = req.get_response_sender()
        lock = threading.Lock()
        text = pb_utils.get_input_tensor_by_name(req, "TEXT").as_numpy()[0, 0].decode("utf-8")
        n = int(pb_utils.get_input_tensor_by_name(req, "N").as_numpy()[0, 0])
        errors = []

        def slow():
            bls = pb_utils.InferenceRequest(
                model_name="smoke_slow",
                requested_output_names=["OUT"],
                inputs=[
                    pb_utils.Tensor("TEXT", np.array([[text.encode()]], dtype=object)),
                    pb_utils.Tensor("N", np.array([[n]], dtype=np.int32)),
                ],
            )
            for r in bls.exec(decoupled=True):
                if r.has_error():
                    errors.append(r.error().message())
                    break
                out = pb_utils.get_output_tensor_by_name(r, "OUT")
                if out is None:  # the flags-only final response
                    continue
                with lock:
                    sender.send(_resp(out.as_numpy()[0, 0].decode("utf-8"), "slow"))

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        for i in range(n):
            with lock:
                sender.send(_resp(f"fast {i} {text}", "fast"))
            time.sleep(0.01)
        t.join()
        if errors:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError("; ".join(errors))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        else:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
