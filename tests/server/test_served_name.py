"""The name clients put in `model` when --served-model-name is not given."""

import pytest
from radixserve.api.app import default_served_name


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/x/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("/m/Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B"),
        ("/m/model.gguf", "model"),
        ("/models/Llama-3-8B/", "Llama-3-8B"),
    ],
)
def test_default_served_name(path, name):
    assert default_served_name(path) == name
