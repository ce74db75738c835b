import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

from engine_adapter.model_config import ModelConfig  # noqa: E402
from engine_adapter.weights import dummy_weights, save_safetensors  # noqa: E402

TINY_MODELS = ("qwen3-moe-tiny", "mixtral-tiny")


@pytest.fixture(scope="session", autouse=True)
def sb3_log_folder(tmp_path_factory):
    """Where SB3 models that tests build themselves log (SB3's default: a new folder under
    /tmp per model, left behind)."""
    folder = tmp_path_factory.mktemp("sb3")
    os.environ["SB3_LOGDIR"] = str(folder)
    return folder


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_checkpoint(request, tmp_path_factory):
    """A Hugging Face-style folder (config.json + model.safetensors) of seeded random weights."""
    name = request.param
    config = ModelConfig.load(name)
    weights = dummy_weights(config, torch.float32, torch.device("cpu"), seed=1234)
    return save_safetensors(config, weights, tmp_path_factory.mktemp(name))
