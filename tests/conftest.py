"""Suite-wide settings."""

import os
import socket

import huggingface_hub
import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels' tests run through Triton's interpreter. The switch is read
    # when triton is first imported, and bitsandbytes or transformers may import it before the
    # kernel tests do, so it is set here, before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host name or open a connection, recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    # huggingface_hub (2.x) fetches a registry for its user-agent header once per process, online
    # mode or not, and lives without it; counted as loaded here, so what is left is the loading.
    agent = getattr(huggingface_hub.utils, "_detect_agent", None)
    if agent is not None and hasattr(agent, "_EMPTY_REGISTRY"):
        monkeypatch.setattr(agent, "_registry", agent._EMPTY_REGISTRY)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
