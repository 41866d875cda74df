"""Plain python step: proves a non-decoupled model can precede the decoupled one in an ensemble."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The stub ignores PYTHONPATH: this import only works if setup.sh installed the
        # project (editable) into the interpreter the stub embeds, and numpy is < 2.
        import json

        from backend.serving.parameters import model_parameters

        assert np.__version__ < "2", np.__version__
        self.params = model_parameters(json.loads(args["model_config"]))
        assert self.params["threads"] == "1", self.params

    def execute(self, requests):
        out = []
        for req in requests:
            text = pb_utils.get_input_tensor_by_name(req, "TEXT").as_numpy()
            up = np.array(
                [[t.decode("utf-8").upper().encode("utf-8") for t in row] for row in text], dtype=object
            )
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT_UP", up)]))
        return out
