"""Decoupled slow stream: N responses, delay_s apart, then a flags-only final response."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay = float(params.get("delay_s", {}).get("string_value", "0.15"))

    def execute(self, requests):
        for req in requests:
            threading.Thread(target=self._run, args=(req,), daemon=True).start()
        return None

    def _run(self, req):
        sender = req.get_response_sender()
        text = pb_utils.get_input_tensor_by_name(req, "TEXT").as_numpy()[0, 0].decode("utf-8")
        n = int(pb_utils.get_input_tensor_by_name(req, "N").as_numpy()[0, 0])
        for i in range(n):
            time.sleep(self.delay)
            out = np.array([[f"slow {i} {text}".encode()]], dtype=object)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
